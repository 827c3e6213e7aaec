"""Which parameters get weight decay: the weight matrices, by the kind of layer that holds them.

AdamW's decoupled weight decay (Loshchilov & Hutter 2019), ``theta <- theta - lr * lambda * theta``,
is meant for the weights that multiply inputs, ``W`` in ``y = x W + b`` or ``y = x (*) W + b``.
It falls on the ``kernel`` of every layer in ``DECAYED_LAYERS`` found anywhere in the model's
graph, whichever helper built it, and on nothing else: not biases, norm scales, embeddings or
the noise schedule's parameters (``vdm.schedules`` holds no such layers).
"""
from __future__ import annotations

import jax
from flax import nnx

# Layers whose ``kernel`` is a weight matrix (or a convolution kernel, one matrix per tap).
DECAYED_LAYERS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.ConvTranspose)


def decay_mask(model: nnx.Module) -> dict:
    """The pure dict of ``model``'s ``nnx.Param`` s (``nnx.to_pure_dict`` layout) with ``True``
    where a parameter gets weight decay: the ``kernel`` of each ``DECAYED_LAYERS`` module.

    Works on an abstract model (``nnx.eval_shape``) as well: only the graph is read.
    """
    decayed = {path + ("kernel",) for path, node in nnx.iter_graph(model) if isinstance(node, DECAYED_LAYERS)}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree_util.tree_map_with_path(lambda path, _: _keys(path) in decayed, params)


def _keys(path) -> tuple:
    """A pytree key path (``DictKey`` s) as the plain tuple of keys that ``nnx.iter_graph`` yields."""
    return tuple(k.key for k in path)
