"""A small residual MLP noise-prediction network for low-dimensional toy data.

Used for 2-D toy densities with Variational Diffusion Models (Kingma, Salimans,
Poole & Ho, 2021, arXiv:2107.00630). Same interface as the U-Nets:
``eps_hat = net(z, gamma, cond=None, *, dropout_rng=None)`` with ``z [B, D]`` and
``gamma [B]``; the output layer is zero-initialised so ``eps_hat == 0`` at init.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vdm.nets.contract import Example, Network, NetworkContext, register
from vdm.nets.layers import Array, DType, NoiseConditioning, call_block, gamma_map, zeros_init


class ResidualDenseBlock(nnx.Module):
    """Pre-norm residual block: ``x + Dense(dropout(swish(Dense(LN(x)) + Dense(cond))))``.

    Call: ``x [B, hidden]``, ``cond [B, cond_dim]``, optional ``dropout_rng`` -> ``[B, hidden]``.
    """

    def __init__(self, hidden: int, cond_dim: int, *, dropout: float, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, **common)
        self.dense1 = nnx.Linear(hidden, hidden, **common)
        self.cond_proj = nnx.Linear(cond_dim, hidden, use_bias=False, **common)
        self.dropout = nnx.Dropout(dropout)
        self.dense2 = nnx.Linear(hidden, hidden, **common)

    def __call__(self, x: Array, cond: Array, dropout_rng: Array | None = None) -> Array:
        h = jax.nn.swish(self.dense1(self.norm(x)) + self.cond_proj(cond))
        h = self.dropout(h, deterministic=dropout_rng is None, rngs=dropout_rng)
        return x + self.dense2(h)


@register("mlp", example=Example({"hidden": 16, "depth": 2, "dropout": 0.2}))
class MLP(Network):
    """Residual MLP score network for ``z [B, D]`` (e.g. ``D = 2`` toy data).

    ``t = (gamma - gamma_min) / (gamma_max - gamma_min)`` is embedded as in the
    VDM U-Net (sinusoidal embedding of ``1000 t``, then two dense+swish layers);
    ``h = Dense(z)``; ``depth`` :class:`ResidualDenseBlock` s; then
    ``LayerNorm -> swish -> Dense`` (zero-initialised) back to ``D``.

    Args:
      context: what the model gives every network (:class:`vdm.nets.NetworkContext`): ``D`` is the size of
        its data (``prod(data_shape)``), ``gamma_min`` / ``gamma_max`` normalise gamma to ``[0, 1]``,
        ``num_classes`` and ``latent_size`` add conditioning (:class:`~vdm.nets.layers.NoiseConditioning`),
        ``gamma_map`` also takes the normalised gamma per element (``[B, D]``) beside ``z`` (the embedding
        sees its per-example mean), ``remat`` rematerialises each residual block, ``dtype`` is the compute
        dtype (the output is always float32); an MLP has no convolutions and ignores ``convolutions``.
      hidden: width of the hidden layers and of the gamma embedding.
      depth: number of residual blocks.
      dropout: dropout rate inside the blocks.
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` for parameter initialisation.

    Call: ``net(z, gamma, cond=None, *, dropout_rng=None)`` with ``z [B, D]``, ``gamma [B]``
    (or a scalar), ``cond`` ``None`` or ``{"label": int [B]}`` -> ``eps_hat [B, D]`` float32.
    """

    input_rank = 2  # takes flat vectors [B, D]

    def __init__(
        self,
        context: NetworkContext,
        *,
        hidden: int = 256,
        depth: int = 4,
        dropout: float = 0.0,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        in_channels = context.in_channels(self.input_rank)
        gamma_min, gamma_max, dtype = context.gamma_min, context.gamma_max, context.dtype
        self.in_channels = in_channels
        self.remat = context.remat
        self.gamma_range = (gamma_min, gamma_max) if context.gamma_map else None
        self.dtype = dtype
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conditioning = NoiseConditioning(hidden, hidden, gamma_min=gamma_min, gamma_max=gamma_max,
                                              num_classes=context.num_classes, latent_size=context.latent_size,
                                              **common)
        self.dense_in = nnx.Linear(in_channels * (2 if context.gamma_map else 1), hidden, **common)
        self.blocks = nnx.List(
            [ResidualDenseBlock(hidden, hidden, dropout=dropout, **common) for _ in range(depth)]
        )
        self.norm_out = nnx.LayerNorm(hidden, **common)
        self.dense_out = nnx.Linear(hidden, in_channels, kernel_init=zeros_init, **common)

    def __call__(self, z: Array, gamma: Array, cond: dict | None = None, *, dropout_rng: Array | None = None) -> Array:
        """Predicts the noise ``eps`` from ``z [B, D]``, ``gamma [B]`` and ``cond``; returns float32 ``[B, D]``."""
        if z.ndim != 2 or z.shape[-1] != self.in_channels:
            raise ValueError(f"expected z of shape [B, {self.in_channels}], got {z.shape}")
        emb = self.conditioning(gamma, cond, z.shape[0])
        h = z.astype(self.dtype)
        if self.gamma_range is not None:
            h = jnp.concatenate([h, gamma_map(gamma, z, *self.gamma_range).astype(self.dtype)], axis=-1)
        h = self.dense_in(h)
        keys = None if dropout_rng is None else jax.random.split(dropout_rng, len(self.blocks))
        apply = nnx.remat(call_block) if self.remat else call_block
        for i, block in enumerate(self.blocks):
            h = apply(block, h, emb, None if keys is None else keys[i])
        h = jax.nn.swish(self.norm_out(h))
        return self.dense_out(h).astype(jnp.float32)
