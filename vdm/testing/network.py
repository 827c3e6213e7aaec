"""The contract checks of a denoising network (``vdm.nets``): run on every registered one by the suite.

A network is a subclass of :class:`vdm.nets.Network`. Built tiny from its example (the registration's
``example``, a :class:`vdm.nets.Example`: its hyper-parameters and the shape of ``z``; by default ``[2, 8, 8, 1]``
images or ``[2, 2]`` vectors by ``input_rank``) with a :class:`vdm.nets.NetworkContext` of that data, it must

- meet the static contract (``vdm.nets.check_contract``) and build;
- take ``z`` of its declared ``input_rank`` and refuse the other rank with a ``ValueError``;
- give float32 of ``z``'s shape, exactly zero at initialisation (with dropout on too), from float32 parameters;
- with its parameters moved at random: be finite, depend on ``z`` and on ``gamma`` of each example, and keep
  the examples of a batch apart;
- apply dropout if and only if a ``dropout_rng`` is given (the same key, the same output), and differ between
  keys if it holds an ``nnx.Dropout`` of positive rate;
- give the same under ``nnx.jit`` as under ``jax.jit`` (for a scalar gamma, which is that gamma for every example);
- built with ``num_classes`` (and ``latent_size``): condition each example on its own label (``cond=None`` is
  the null class ``num_classes``) and its own latent; built without classes, refuse a label (``ValueError``);
- take gamma per element (``z``'s shape) as its per-example mean, and built with ``gamma_map``, read the map
  per element too;
- compute in bfloat16 (``dtype``) from the same float32 parameters, close to float32;
- have finite gradients at initialisation, and with its parameters moved, a non-zero gradient for every
  parameter (no dead path);
- built with ``remat``: rematerialise (a ``remat`` in its backward pass) and give the same loss and gradients.

Every forward pass is compiled through a few shared ``jax.jit`` functions of the network (a pytree), so checks
of one structure share their compilations: keep the example tiny.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdm import nets, testing
from vdm.nets.contract import Example, as_example

KIND = "network"
GAMMA_MIN, GAMMA_MAX = -13.3, 5.0  # the context's gamma range in the checks
NUM_CLASSES = 3  # classes of the conditional network checked
LATENT_SIZE = 2  # the size of its auxiliary latent
PERTURBATION = 0.1  # the standard deviation of the random move of every parameter (wakes the zero head)
TOLERANCE = 1e-5  # float32: what may differ between two ways of computing the same values


def example_of(piece: type[nets.Network], example: Example | dict | None = None) -> Example:
    """The example the checks build ``piece`` from, its ``shape`` filled in (``Example.z_shape``).

    Raises:
        TypeError: an example of another type.
        ValueError: a shape not of the network's ``input_rank``, or a batch of fewer than 2 examples.
    """
    example = as_example(example)
    shape = example.z_shape(piece.input_rank)
    if len(shape) != piece.input_rank or shape[0] < 2:
        raise ValueError(f"example shape {shape}: must have rank input_rank={piece.input_rank} and a batch of at "
                         "least 2")
    return dataclasses.replace(example, shape=shape)


def build(piece: type[nets.Network], example: Example | dict | None = None, *, seed: int = 0,
          **context: Any) -> nets.Network:
    """``piece`` built from ``example`` (its kwargs) for the data of its shape, with the context fields ``context``.

    Example: ``build(UNet, example, remat=True)``; ``nnx.eval_shape(lambda: build(...))`` for abstract
    parameters. :func:`initialise` builds it faster for the checks.

    Args:
        piece: the network class.
        example: its :class:`vdm.nets.Example` (see :func:`example_of`).
        seed: the seed of ``nnx.Rngs``.
        **context: fields of :class:`vdm.nets.NetworkContext` besides ``data_shape`` (default gamma range:
            ``GAMMA_MIN``, ``GAMMA_MAX``).

    Returns:
        The network.
    """
    example = example_of(piece, example)
    fields = {"gamma_min": GAMMA_MIN, "gamma_max": GAMMA_MAX, **context}
    return piece(nets.NetworkContext(data_shape=example.shape[1:], **fields), rngs=nnx.Rngs(seed), **example.kwargs)


def initialise(piece: type[nets.Network], example: Example | dict | None = None, **context: Any) -> nets.Network:
    """:func:`build` as the checks build: compiled in one piece, with the non-partitionable threefry (the same
    distributions, other draws: XLA:CPU compiles the random initialisers of a network several times faster)."""
    with jax.threefry_partitionable(False):
        return nnx.jit(lambda: build(piece, example, **context))()


def inputs(piece: type[nets.Network], example: Example | dict | None = None,
           seed: int = 1) -> tuple[jax.Array, jax.Array]:
    """``(z, gamma)`` for the checks: ``z ~ N(0, I)`` of the example's shape, ``gamma [B]`` spread over the range."""
    shape = example_of(piece, example).shape
    z = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    return z, jnp.linspace(GAMMA_MIN + 1.0, GAMMA_MAX - 1.0, shape[0], dtype=jnp.float32)


def perturb(net: nnx.Module, seed: int, scale: float = PERTURBATION) -> nnx.Module:
    """A copy of ``net`` with ``scale * N(0, 1)`` added to every floating-point variable (drawn on the host with
    numpy: no compilation of a random kernel per shape); it wakes the zero-initialised head."""
    graphdef, state = nnx.split(net)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    moved = [jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype))
             if jnp.issubdtype(x.dtype, jnp.floating) else x for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, moved))


def variant(piece: type[nets.Network], example: Example | dict | None, like: nnx.Module, seed: int,
            **context: Any) -> nets.Network:
    """``piece`` built with the context fields ``context`` (``num_classes=3``, ``gamma_map=True``, ...), holding the
    values of ``like`` (a network of the same piece) where a variable's path and shape agree and
    ``PERTURBATION * N(0, 1)`` elsewhere (a class embedding, a wider first layer): built abstractly, nothing
    initialised, no compilation."""
    net = nnx.eval_shape(lambda: build(piece, example, **context))
    known = dict(nnx.to_flat_state(nnx.state(like)))
    rng = np.random.default_rng(seed)

    def fill(path, variable):
        value = variable.get_value()
        old = known.get(path)
        if old is not None and old.get_value().shape == value.shape:
            return variable.replace(old.get_value())
        if jnp.issubdtype(value.dtype, jnp.floating):
            return variable.replace(jnp.asarray(PERTURBATION * rng.standard_normal(value.shape), value.dtype))
        raise AssertionError(f"no value for the new variable {path} of dtype {value.dtype}")

    nnx.update(net, nnx.map_state(fill, nnx.state(net)))
    return net


@jax.jit
def apply(net, z, gamma, cond=None, key=None):
    """``net(z, gamma, cond, dropout_rng=key)`` compiled; the network is an ordinary pytree argument."""
    return net(z, gamma, cond, dropout_rng=key)


def _host(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _per_example_change(a, b) -> np.ndarray:
    """max |a - b| of each example."""
    return np.abs(_host(a) - _host(b)).reshape(a.shape[0], -1).max(axis=1)


def _refuses(fn, *args) -> bool:
    """Whether tracing ``fn(*args)`` (no compilation) raises ``ValueError``."""
    try:
        jax.eval_shape(fn, *args)
    except ValueError:
        return True
    return False


def _params_vector(tree) -> np.ndarray:
    return np.concatenate([np.ravel(_host(x)) for x in jax.tree.leaves(tree)])


def _loss(params, graphdef, rest, z, gamma, target):
    return jnp.mean(jnp.square(nnx.merge(graphdef, params, rest)(z, gamma) - target))


# (loss, gradient in the parameters) of ``_loss``, compiled per structure (graphdef)
_loss_and_grads = jax.jit(jax.value_and_grad(_loss), static_argnums=1)


@jax.jit
def _probe(net, z, gamma, target, key):
    """What the checks read of a network of one structure at ``[B]`` gamma, in one compiled program: its output
    without and with dropout (``key``), and the loss ``mean((net(z, gamma) - target)^2)`` with its gradient in
    the parameters (the output without dropout and the loss's forward pass are the same computation)."""
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    loss, grads = jax.value_and_grad(_loss)(params, graphdef, rest, z, gamma, target)
    return net(z, gamma), net(z, gamma, dropout_rng=key), loss, grads


def _rematerialises(piece, example, remat: bool) -> bool:
    """Whether the backward pass of ``piece`` built with ``remat`` (plain convolutions: the custom ones hold a
    remat of their own) holds a rematerialisation; traced only, from abstract parameters."""
    net = nnx.eval_shape(lambda: build(piece, example, remat=remat, convolutions=nets.Convolutions("plain")))
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    z, gamma = inputs(piece, example)
    return "remat" in str(jax.make_jaxpr(jax.grad(_loss))(params, graphdef, rest, z, gamma, z))


def check(name: str, piece: Any, example: Example | dict | None) -> None:
    """Run every check of the network contract (the module docstring) on ``piece``.

    Args:
        name: the name in messages.
        piece: the network class.
        example: its :class:`vdm.nets.Example` (or a dict of its fields); ``None``: the network's defaults at
            ``[2, 8, 8, 1]`` or ``[2, 2]``.

    Raises:
        AssertionError: ``network '<name>' fails <check>: <what was found>``.
    """
    # the non-partitionable threefry, as in initialise: the same distributions of the dropout masks, other draws,
    # and the programs holding dropout compile a third faster on XLA:CPU
    with jax.threefry_partitionable(False):
        _check(name, piece, example)


def _check(name: str, piece: Any, example: Example | dict | None) -> None:
    checking = testing.checker(KIND, name)

    with checking("the static contract"):
        nets.check_contract(name, piece)
    with checking("construction"):
        example = example_of(piece, example)
        net = initialise(piece, example)
        assert isinstance(net, nets.Network), f"built {type(net).__name__}, not a vdm.nets.Network"
    z, gamma = inputs(piece, example)
    target = inputs(piece, example, seed=3)[0]
    rank = piece.input_rank

    with checking("input rank"):
        other = z.reshape(z.shape[0], -1) if rank == 4 else z[:, None, None, :]
        out = jax.eval_shape(lambda n, z, g: n(z, g), net, z, gamma)
        assert _refuses(lambda n, z, g: n(z, g), net, other, gamma), (
            f"declares input_rank={rank} but takes z of shape {other.shape} without a ValueError")
    with checking("output shape and dtype"):
        assert out.shape == z.shape, f"output {out.shape} for z {z.shape}"
        assert out.dtype == jnp.float32, f"output dtype {out.dtype}, not float32"
    with checking("zero at initialisation"):
        key = jax.random.key(0)
        *outs, _, grads_at_init = _probe(net, z, gamma, target, key)
        for out, dropout_rng in zip(outs, (None, key)):
            out = _host(out)
            assert np.all(out == 0.0), f"max |out| = {np.abs(out).max()} at initialisation (dropout_rng={dropout_rng})"
    with checking("float32 parameters"):
        params = jax.tree.leaves(nnx.state(net, nnx.Param))
        assert params, "no nnx.Param"
        assert all(p.dtype == jnp.float32 for p in params), sorted({str(p.dtype) for p in params})

    moved = perturb(net, 42)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    base, a, loss, grads = _probe(moved, z, gamma, target, k1)
    base, a = _host(base), _host(a)

    def output(z, gamma):
        return _probe(moved, z, gamma, target, k1)[0]

    with checking("finiteness"):
        assert np.all(np.isfinite(base)), "non-finite output"
    with checking("dependence on z and gamma"):
        assert np.abs(base).max() > 1e-3, f"max |out| = {np.abs(base).max()} with its parameters moved"
        by_gamma = _per_example_change(base, output(z, gamma[::-1]))
        assert by_gamma.min() > 1e-4, f"an example ignores gamma: change {by_gamma}"
        by_z = _per_example_change(base, output(inputs(piece, example, seed=7)[0], gamma))
        assert by_z.min() > 1e-4, f"an example ignores z: change {by_z}"
    with checking("batch independence"):
        other_z = z.at[1:].set(inputs(piece, example, seed=9)[0][1:])
        changed = _per_example_change(base, output(other_z, gamma.at[1:].add(0.5)))
        assert changed[0] <= TOLERANCE, f"changing the other examples changes example 0 by {changed[0]}"
    with checking("dropout only with a key"):
        np.testing.assert_array_equal(_host(output(z, gamma)), base)
        b = _host(_probe(moved, z, gamma, target, k2)[1])
        np.testing.assert_array_equal(_host(_probe(moved, z, gamma, target, k1)[1]), a, "the same key, another output")
        dropouts = [node for _, node in nnx.iter_graph(moved) if isinstance(node, nnx.Dropout) and node.rate > 0]
        if dropouts:
            assert np.abs(a - b).max() > 1e-4, "holds dropout, but two keys give the same output"
            assert np.abs(a - base).max() > 1e-4, "holds dropout, but a key changes nothing"
            # without a key the network is itself without dropout: every rate 0, given a key
            off = nnx.clone(moved)
            for _, node in nnx.iter_graph(off):
                if isinstance(node, nnx.Dropout):
                    node.rate = 0.0
            error = np.abs(_host(apply(off, z, gamma, None, k1)) - base).max()
            assert error <= TOLERANCE, f"without a key, dropout is on (output {error} from the network without dropout)"

    # gamma per element (z's shape), constant per example, and the same with gamma raised at the first element of
    # example 0 and lowered at the second: the same mean, only a map sees it
    per_element = jnp.broadcast_to(gamma.reshape((-1,) + (1,) * (z.ndim - 1)), z.shape)
    shifted = per_element.reshape(z.shape[0], -1).at[0, 0].add(3.0).at[0, 1].add(-3.0).reshape(z.shape)
    # under nnx.jit, one program: a scalar gamma and a gamma per element
    scalar_and_map = nnx.jit(lambda m, z, g, elements: (m(z, g), m(z, elements)))
    scalar, plain = map(_host, scalar_and_map(moved, z, gamma[1], per_element))
    with checking("a scalar gamma, under nnx.jit"):  # nnx.jit is jax.jit's equal
        np.testing.assert_allclose(scalar, _host(output(z, jnp.full_like(gamma, gamma[1]))), atol=TOLERANCE)
    with checking("a gamma per element"):  # the embedding takes its per-example mean: the map is a constant
        np.testing.assert_allclose(plain, base, rtol=TOLERANCE, atol=TOLERANCE,
                                   err_msg="a constant map is not its per-example gamma")
        np.testing.assert_allclose(_host(scalar_and_map(moved, z, gamma[1], shifted)[1]), plain, rtol=TOLERANCE,
                                   atol=TOLERANCE, err_msg="without gamma_map, more than the mean of the map counts")
    with checking("gamma_map"):  # built with gamma_map, the network reads the map per element too
        mapped = variant(piece, example, moved, 6, gamma_map=True)
        constant, by_example = map(_host, _outputs(mapped, z, (per_element, gamma), (None, None)))
        np.testing.assert_allclose(constant, by_example, rtol=TOLERANCE, atol=TOLERANCE,
                                   err_msg="a constant map is not its per-example gamma")
        change = _per_example_change(constant, _outputs(mapped, z, (shifted, gamma), (None, None))[0])
        assert change[0] > 1e-4, "built with gamma_map, ignores how gamma varies over the elements"
        assert change[1:].max() <= TOLERANCE, f"a map of example 0 changes the others by {change[1:]}"

    _check_conditioning(checking, piece, example, net, moved, z, gamma)

    with checking("bfloat16 compute"):
        half = variant(piece, example, moved, 0, dtype=jnp.bfloat16)
        assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(half, nnx.Param))), "bfloat16 parameters"
        out = apply(half, z, gamma)
        assert out.dtype == jnp.float32 and out.shape == z.shape, f"output {out.dtype} {out.shape}"
        err = np.abs(_host(out) - base).max()
        assert err < 0.05 * np.abs(base).max() + 1e-3, f"max error {err} against float32 (max |out| {np.abs(base).max()})"

    with checking("gradients"):
        at_init = _params_vector(grads_at_init)
        assert np.all(np.isfinite(at_init)) and np.any(at_init != 0), "non-finite or all-zero gradient at initialisation"
        dead = [jax.tree_util.keystr(p) for p, g in jax.tree.leaves_with_path(grads) if not np.any(_host(g) != 0)]
        assert not dead, f"no gradient reaches {dead}"
        reference = _params_vector(grads)
        assert np.all(np.isfinite(reference)), "non-finite gradient"
    with checking("remat"):
        assert _rematerialises(piece, example, True) and not _rematerialises(piece, example, False), (
            "built with remat=True its backward pass holds no remat (or one without)")
        again = variant(piece, example, moved, 0, remat=True)
        graphdef, params, rest = nnx.split(again, nnx.Param, ...)
        loss_remat, grads_remat = _loss_and_grads(params, graphdef, rest, z, gamma, target)
        np.testing.assert_allclose(float(loss_remat), float(loss), rtol=TOLERANCE)
        error = np.linalg.norm(_params_vector(grads_remat) - reference)
        assert error <= TOLERANCE * np.linalg.norm(reference), f"gradient differs by {error} with remat"


@jax.jit
def _outputs(net, z, gammas, conds):
    """``[net(z, gamma, cond) for gamma, cond in zip(gammas, conds)]`` in one compiled program."""
    return [net(z, g, c) for g, c in zip(gammas, conds)]


def _check_conditioning(checking, piece, example, net, moved, z, gamma) -> None:
    """Class and latent conditioning, each example on its own; an unconditional network refuses a label."""
    labels = jnp.arange(z.shape[0], dtype=jnp.int32) % NUM_CLASSES
    with checking("class conditioning"):
        assert _refuses(lambda n, z, g, c: n(z, g, c), net, z, gamma, {"label": labels}), (
            "built with num_classes=0, takes a label without a ValueError")
        conditional = variant(piece, example, moved, 5, num_classes=NUM_CLASSES, latent_size=LATENT_SIZE)
        latent = jax.random.normal(jax.random.key(4), (z.shape[0], LATENT_SIZE))

        def outputs(labels, latent):  # (labelled, without a label): one program
            return _outputs(conditional, z, (gamma, gamma), ({"label": labels, "latent": latent}, {"latent": latent}))

        out, unlabelled = outputs(labels, latent)
        relabelled = labels.at[1].set((labels[1] + 1) % NUM_CLASSES)
        change = _per_example_change(out, outputs(relabelled, latent)[0])
        assert change[0] <= TOLERANCE and change[1] > 1e-4, f"a new label for example 1 changes the examples by {change}"
        np.testing.assert_allclose(_host(unlabelled), _host(outputs(jnp.full_like(labels, NUM_CLASSES), latent)[0]),
                                   atol=TOLERANCE, err_msg="no label is not the null class num_classes")
    with checking("latent conditioning"):
        change = _per_example_change(out, outputs(labels, latent.at[1].add(1.0))[0])
        assert change[0] <= TOLERANCE and change[1] > 1e-4, f"a new latent for example 1 changes the examples by {change}"
