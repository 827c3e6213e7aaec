"""U-Net noise-prediction networks for Variational Diffusion Models.

``UNet`` is the network of VDM (Kingma, Salimans, Poole & Ho, 2021,
arXiv:2107.00630, appendix B; ``ScoreUNet`` in ``google-research/vdm``, and here until 0.2: that name
still imports for one release, with a ``DeprecationWarning``):
a U-Net *without* any downsampling, i.e. a deep stack of residual blocks at
full resolution, with base-2 Fourier features of the input concatenated to it.
``vdm.nets.multires_unet.MultiResUNet`` is the DDPM-style multi-resolution U-Net
(Ho et al., 2020), with the same conditioning and blocks, for cheap runs on small images.

Both map ``z [B, H, W, C]`` float, ``gamma [B]`` (``-log SNR``) and ``cond``
(``None`` or ``{"label": int [B]}``) to ``eps_hat [B, H, W, C]`` float32, condition on
the normalised ``t = (gamma - gamma_min) / (gamma_max - gamma_min)`` (plus a class
embedding when built with ``num_classes``; see :class:`NoiseConditioning`) and zero-initialise the
output convolution so that ``eps_hat == 0`` at initialisation. Dropout is
active if and only if ``dropout_rng`` is passed.

Unlike the VDM reference code, no "base measure" ``eps_hat += z`` is added: the
network output is the noise prediction itself.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from vdm.nets.contract import Example, Network, NetworkContext, register
from vdm.nets.kernels import Convolutions
from vdm.nets.layers import (
    Array,
    AttnBlock,
    DType,
    NoiseConditioning,
    ResnetBlock,
    call_block,
    check_images,
    conv3x3,
    gamma_map,
    group_norm,
    input_channels,
    input_features,
    split_or_none,
)


class ResAttnStage(nnx.Module):
    """One step of the ``UNet`` paths: a :class:`ResnetBlock`, then optionally an :class:`AttnBlock`.

    Call: ``x [B, H, W, in_channels]``, ``cond [B, cond_dim]``, optional
    ``dropout_rng`` -> ``[B, H, W, out_channels]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        *,
        attention: bool,
        dropout: float,
        convolutions: Convolutions,
        dtype: DType,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.block = ResnetBlock(in_channels, out_channels, cond_dim, dropout=dropout, convolutions=convolutions,
                                 **common)
        self.attn = AttnBlock(out_channels, **common) if attention else None

    def __call__(self, x: Array, cond: Array, dropout_rng: Array | None = None) -> Array:
        h = self.block(x, cond, dropout_rng)
        if self.attn is not None:
            h = self.attn(h)
        return h


# scan_blocks="auto": unrolled up to this depth, scanned above. Measured on the 2-core CPU
# (experiments/performance/README.md): unrolled is 12% faster at 4 blocks x 32 channels on MNIST and
# 3% at 4 x 128 on 32 x 32 images with a similar compile time; at the paper's 32 x 128 it is 21%
# slower and compiles 5.7x longer (88 s vs 15 s).
UNROLL_MAX_BLOCKS = 4


@register("unet", example=Example({"channels": 8, "num_blocks": 1, "dropout": 0.2, "scan_blocks": True}))
class UNet(Network):
    """The VDM network: a full-resolution U-Net with Fourier-feature inputs.

    Structure (VDM ``ScoreUNet``; paper CIFAR-10 setting ``channels=128,
    num_blocks=32, dropout=0.1, attention=False``):

    * ``t = (gamma - gamma_min) / (gamma_max - gamma_min)``;
      ``cond = swish(Dense(swish(Dense(emb(1000 t)))))``, size ``4 * channels``.
    * ``h0 = conv3x3([z, fourier_features(z)])`` with ``channels`` outputs.
    * Down path: ``num_blocks`` stages ``ResnetBlock(ch -> ch)`` (+ attention
      if ``attention``); the outputs ``h1 .. hN`` and ``h0`` are kept as skips.
    * Middle: ``ResnetBlock``, ``AttnBlock`` (always, as in VDM), ``ResnetBlock``.
    * Up path: ``num_blocks + 1`` stages ``ResnetBlock(2 ch -> ch)`` applied to
      ``concat([h, skip])`` with skips ``hN, ..., h1, h0`` (+ attention if
      ``attention``).
    * Head: ``GroupNorm -> swish -> conv3x3`` (zero-initialised) to ``C`` channels.

    With ``scan_blocks=True`` the parameters of the down stages (and of the up
    stages, which all have identical shapes as well) are stored stacked along
    a leading axis of size ``num_blocks`` (``num_blocks + 1``), created with
    ``nnx.vmap`` and applied with ``nnx.scan``, so trace/compile time does not
    grow with depth. With ``scan_blocks=False`` they are ``nnx.List`` s of
    independent stages; both variants compute the same function of the same
    parameters (stage ``i`` of the list = slice ``i`` of the stack), including
    the dropout masks. ``remat=True`` rematerialises each stage in the backward
    pass (``nnx.remat``), trading compute for memory. The 3x3 convolutions are
    computed by ``convolutions`` (:class:`vdm.nets.kernels.Convolutions`), whose
    gradient avoids XLA:CPU's slow path for convolutions inside loops, so scanning
    costs little on CPU too.

    Args:
      context: what the model gives every network (:class:`vdm.nets.NetworkContext`): ``C`` is the last axis
        of its data's shape (``z`` is ``[B, H, W, C]``, any ``H``, ``W``), ``gamma_min`` / ``gamma_max``
        normalise gamma to ``[0, 1]``, ``num_classes`` and ``latent_size`` add conditioning (see
        :class:`NoiseConditioning`), ``gamma_map`` also takes the normalised gamma as a map beside ``z``
        (``C`` more input channels; the embedding sees its per-example mean), ``remat`` rematerialises
        (gradient-checkpoints) each stage, ``convolutions`` computes the convolutions and their derivatives
        (:class:`vdm.nets.kernels.Convolutions`; speed, not values or parameters), ``dtype`` is the compute
        dtype (the output is always float32).
      channels: width of the network (paper: 128).
      num_blocks: residual stages in the down path (paper: 32).
      attention: add self-attention after every down/up stage.
      dropout: dropout rate inside the residual blocks.
      with_fourier_features: concatenate base-2 Fourier features to the input.
      fourier_min, fourier_max: exponent range (inclusive) of the Fourier
        features (VDM: 6, 7, i.e. ``sin/cos(2**n * 2 pi z)``).
      scan_blocks: store the repeated stages stacked and apply them with ``nnx.scan``; ``"auto"`` (the
        default): scan above ``UNROLL_MAX_BLOCKS`` blocks, unrolled up to it. Depends on the depth
        only, never the backend, so a checkpoint's layout is the same on every machine.
      param_dtype: parameter dtype.
      rngs: ``nnx.Rngs`` for parameter initialisation.

    Call: ``net(z, gamma, cond=None, *, dropout_rng=None)`` with ``z [B, H, W, C]``,
    ``gamma [B]`` (or a scalar), ``cond`` ``None`` or ``{"label": int [B]}`` ->
    ``eps_hat [B, H, W, C]`` float32.
    """

    input_rank = 4  # takes images [B, H, W, C]

    def __init__(
        self,
        context: NetworkContext,
        *,
        channels: int = 128,
        num_blocks: int = 32,
        attention: bool = False,
        dropout: float = 0.1,
        with_fourier_features: bool = True,
        fourier_min: int = 6,
        fourier_max: int = 7,
        scan_blocks: bool | str = "auto",
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if scan_blocks == "auto":
            scan_blocks = num_blocks > UNROLL_MAX_BLOCKS
        elif not isinstance(scan_blocks, bool):
            raise ValueError(f"scan_blocks must be True, False or 'auto', got {scan_blocks!r}")
        in_channels = context.in_channels(self.input_rank)
        gamma_min, gamma_max, gamma_map = context.gamma_min, context.gamma_max, context.gamma_map
        remat, convolutions, dtype = context.remat, context.convolutions, context.dtype
        self.in_channels = in_channels
        self.channels = channels
        self.num_blocks = num_blocks
        self.use_fourier = with_fourier_features
        self.fourier_min = fourier_min
        self.fourier_max = fourier_max
        self.scan_blocks = scan_blocks
        self.remat = remat
        self.dtype = dtype
        self.gamma_range = (gamma_min, gamma_max) if gamma_map else None

        common = dict(dtype=dtype, param_dtype=param_dtype)
        cond_dim = 4 * channels
        self.conditioning = NoiseConditioning(channels, cond_dim, gamma_min=gamma_min, gamma_max=gamma_max,
                                              num_classes=context.num_classes, latent_size=context.latent_size,
                                              **common, rngs=rngs)
        conv_in_channels = input_channels(in_channels, with_fourier_features, fourier_min, fourier_max) + (
            in_channels if gamma_map else 0)
        self.conv_in = conv3x3(conv_in_channels, channels, convolutions=convolutions, **common, rngs=rngs)

        def make_stage(rngs: nnx.Rngs, in_ch: int, attn: bool) -> ResAttnStage:
            return ResAttnStage(in_ch, channels, cond_dim, attention=attn, dropout=dropout, convolutions=convolutions,
                                **common, rngs=rngs)

        def make_stack(num: int, in_ch: int) -> ResAttnStage | nnx.List:
            if not scan_blocks:
                return nnx.List([make_stage(rngs, in_ch, attention) for _ in range(num)])

            @nnx.split_rngs(splits=num)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make_stacked(stage_rngs: nnx.Rngs) -> ResAttnStage:
                return make_stage(stage_rngs, in_ch, attention)

            return make_stacked(rngs)

        self.down = make_stack(num_blocks, channels)
        block = dict(dropout=dropout, convolutions=convolutions, **common, rngs=rngs)
        self.mid_block1 = ResnetBlock(channels, channels, cond_dim, **block)
        self.mid_attn = AttnBlock(channels, **common, rngs=rngs)
        self.mid_block2 = ResnetBlock(channels, channels, cond_dim, **block)
        self.up = make_stack(num_blocks + 1, 2 * channels)
        self.norm_out = group_norm(channels, **common, rngs=rngs)
        self.conv_out = conv3x3(channels, in_channels, zero_init=True, convolutions=convolutions, **common, rngs=rngs)

    def _scan(self, stack: ResAttnStage, body, carry: Array, xs):
        """``jax.lax.scan`` of ``body(stage, carry, x)`` over the stacked stages.

        A plain ``lax.scan`` over the split state (rather than ``nnx.scan``) so that the
        network can be called inside any outer JAX transform, e.g. a sampler's
        ``fori_loop`` that closes over the parameters.
        """
        graphdef, state = nnx.split(stack)

        def step(carry, inputs):
            stage_state, x = inputs
            return body(nnx.merge(graphdef, stage_state), carry, x)

        if self.remat:
            step = jax.checkpoint(step)
        return jax.lax.scan(step, carry, (state, xs))

    def _run_down(self, h: Array, cond: Array, keys: Array | None) -> tuple[Array, Array]:
        """Applies the down stages; returns the last output and all outputs ``[N, B, H, W, ch]``."""
        if self.scan_blocks:
            def body(stage, carry, key):
                out = call_block(stage, carry, cond, key)
                return out, out

            return self._scan(self.down, body, h, keys)
        apply = nnx.remat(call_block) if self.remat else call_block
        outs = []
        for i, stage in enumerate(self.down):
            h = apply(stage, h, cond, None if keys is None else keys[i])
            outs.append(h)
        return h, jnp.stack(outs)

    def _run_up(self, h: Array, skips: Array, cond: Array, keys: Array | None) -> Array:
        """Applies the up stages to ``concat([h, skips[i]])`` for ``i = 0 .. N``; returns the last output."""
        if self.scan_blocks:
            def body(stage, carry, inputs):
                skip, key = inputs
                return call_block(stage, jnp.concatenate([carry, skip], axis=-1), cond, key), None

            return self._scan(self.up, body, h, (skips, keys))[0]
        apply = nnx.remat(call_block) if self.remat else call_block
        for i, stage in enumerate(self.up):
            h = apply(stage, jnp.concatenate([h, skips[i]], axis=-1), cond, None if keys is None else keys[i])
        return h

    def __call__(self, z: Array, gamma: Array, cond: dict | None = None, *,
                 dropout_rng: Array | None = None) -> Array:
        """Predicts the noise ``eps`` from ``z [B, H, W, C]``, ``gamma [B]`` and ``cond``; float32 ``[B, H, W, C]``."""
        check_images(z, self.in_channels)
        cond = self.conditioning(gamma, cond, z.shape[0])
        h = input_features(z, self.use_fourier, self.fourier_min, self.fourier_max)
        if self.gamma_range is not None:
            h = jnp.concatenate([h, gamma_map(gamma, z, *self.gamma_range)], axis=-1)
        h0 = self.conv_in(h.astype(self.dtype))

        down_keys = split_or_none(dropout_rng, 0, self.num_blocks)
        mid_keys = split_or_none(dropout_rng, 1, 2)
        up_keys = split_or_none(dropout_rng, 2, self.num_blocks + 1)

        h, down_outs = self._run_down(h0, cond, down_keys)
        h = self.mid_block1(h, cond, None if mid_keys is None else mid_keys[0])
        h = self.mid_attn(h)
        h = self.mid_block2(h, cond, None if mid_keys is None else mid_keys[1])
        # Skips are consumed last-in first-out: h_N, ..., h_1, h_0.
        skips = jnp.concatenate([h0[None], down_outs], axis=0)[::-1]
        h = self._run_up(h, skips, cond, up_keys)

        h = jax.nn.swish(self.norm_out(h))
        return self.conv_out(h).astype(jnp.float32)


def __getattr__(name: str):
    """``ScoreUNet``, the 0.2 name of :class:`UNet`, kept for one release: the same class, with a
    ``DeprecationWarning`` naming ``UNet`` at each access. Raises AttributeError for any other missing name."""
    if name == "ScoreUNet":
        warnings.warn("vdm.nets.unet.ScoreUNet is deprecated: use vdm.nets.unet.UNet (the same class)",
                      DeprecationWarning, stacklevel=2)
        return UNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
