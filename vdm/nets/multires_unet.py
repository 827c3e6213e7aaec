"""The DDPM-style multi-resolution U-Net (Ho et al., 2020) with VDM's conditioning and input features.

It shares the blocks, the noise conditioning and the head of ``vdm.nets.unet.UNet`` (whose module
docstring states the common interface) and adds resolution levels: cheap runs on small images.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def space_to_depth(x: Array, p: int) -> Array:
    """[B, H, W, C] -> [B, H/p, W/p, p*p*C]: each p x p patch becomes one position."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: Array, p: int) -> Array:
    """Inverse of :func:`space_to_depth`."""
    if p == 1:
        return x
    b, h, w, pc = x.shape
    c = pc // (p * p)
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


class Downsample(nnx.Module):
    """Halves H and W: stride-2 3x3 conv, or 2x2 average pooling without ``with_conv``.

    Call: ``x [B, H, W, C]`` with even ``H, W`` -> ``[B, H/2, W/2, C]``.
    """

    def __init__(self, channels: int, *, with_conv: bool, convolutions: Convolutions, dtype: DType,
                 param_dtype: DType, rngs: nnx.Rngs):
        self.conv = (
            conv3x3(channels, channels, stride=2, convolutions=convolutions, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs)
            if with_conv
            else None
        )

    def __call__(self, x: Array) -> Array:
        if self.conv is not None:
            return self.conv(x)
        b, h, w, c = x.shape
        return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Upsample(nnx.Module):
    """Doubles H and W by nearest-neighbour repetition, followed by a 3x3 conv if ``with_conv``.

    Call: ``x [B, H, W, C]`` -> ``[B, 2H, 2W, C]``.
    """

    def __init__(self, channels: int, *, with_conv: bool, convolutions: Convolutions, dtype: DType,
                 param_dtype: DType, rngs: nnx.Rngs):
        self.conv = (
            conv3x3(channels, channels, convolutions=convolutions, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if with_conv
            else None
        )

    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x) if self.conv is not None else x


@register("multires_unet", example=Example({"channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1,
                                            "dropout": 0.2}))
class MultiResUNet(Network):
    """DDPM-style multi-resolution U-Net with VDM conditioning and input features.

    Level ``i`` (``i = 0 .. L-1``, ``L = len(channel_mult)``) works at
    resolution ``H / 2**i`` with ``channels * channel_mult[i]`` channels and has
    ``num_res_blocks`` residual blocks (followed by self-attention when
    ``i in attention_levels``); every level but the last ends with a
    :class:`Downsample`. The middle is ``ResnetBlock, AttnBlock (if
    mid_attention), ResnetBlock``. The up path mirrors it with
    ``num_res_blocks + 1`` blocks per level, each taking ``concat([h, skip])``,
    and an :class:`Upsample` between levels. Head, conditioning and Fourier
    features are as in :class:`UNet`.

    ``H`` and ``W`` must be divisible by ``2**(L - 1)``; e.g. with
    ``channel_mult=(1, 2, 2)`` a 28x28 image runs at 28, 14 and 7, and 8x8 at
    8, 4 and 2. Other sizes raise a ``ValueError`` at call time.

    Args:
      context: what the model gives every network (:class:`vdm.nets.NetworkContext`), read as in
        :class:`UNet` (``remat`` rematerialises each residual block).
      channels: base width.
      channel_mult: width multiplier of each resolution level.
      num_res_blocks: residual blocks per level in the down path.
      attention_levels: indices of the levels that get self-attention.
      mid_attention: self-attention between the two middle residual blocks.
      dropout: dropout rate inside the residual blocks.
      resample_with_conv: strided conv / conv after nearest upsampling (else
        average pooling / plain nearest upsampling).
      patch_size: the side of the square patches that become single positions before the first level
        (``space_to_depth``); ``H`` and ``W`` must then be divisible by ``patch_size * 2**(L - 1)``.
      with_fourier_features, fourier_min, fourier_max, param_dtype, rngs: as in :class:`UNet`.

    Call: ``net(z, gamma, cond=None, *, dropout_rng=None)`` with ``z [B, H, W, C]``,
    ``gamma [B]`` (or a scalar), ``cond`` ``None`` or ``{"label": int [B]}`` ->
    ``eps_hat [B, H, W, C]`` float32.
    """

    input_rank = 4  # takes images [B, H, W, C]

    def __init__(
        self,
        context: NetworkContext,
        *,
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_levels: Sequence[int] = (),
        mid_attention: bool = True,
        dropout: float = 0.1,
        resample_with_conv: bool = True,
        patch_size: int = 1,
        with_fourier_features: bool = True,
        fourier_min: int = 6,
        fourier_max: int = 7,
        param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        channel_mult = tuple(channel_mult)
        in_channels = context.in_channels(self.input_rank)
        gamma_min, gamma_max, gamma_map = context.gamma_min, context.gamma_max, context.gamma_map
        remat, convolutions, dtype = context.remat, context.convolutions, context.dtype
        self.gamma_range = (gamma_min, gamma_max) if gamma_map else None
        self.remat = remat
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        self.patch_size = patch_size
        attention_levels = tuple(attention_levels)
        if not channel_mult:
            raise ValueError("channel_mult must be non-empty")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        if any(not 0 <= i < len(channel_mult) for i in attention_levels):
            raise ValueError(f"attention_levels {attention_levels} out of range for {len(channel_mult)} levels")
        self.in_channels = in_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.use_fourier = with_fourier_features
        self.fourier_min = fourier_min
        self.fourier_max = fourier_max
        self.dtype = dtype

        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        cond_dim = 4 * channels
        num_levels = len(channel_mult)

        def res(in_ch: int, out_ch: int) -> ResnetBlock:
            return ResnetBlock(in_ch, out_ch, cond_dim, dropout=dropout, convolutions=convolutions, **common)

        def attn(ch: int, level: int) -> AttnBlock | None:
            return AttnBlock(ch, **common) if level in attention_levels else None

        self.conditioning = NoiseConditioning(channels, cond_dim, gamma_min=gamma_min, gamma_max=gamma_max,
                                              num_classes=context.num_classes, latent_size=context.latent_size,
                                              **common)
        conv_in_channels = input_channels(in_channels, with_fourier_features, fourier_min, fourier_max) + (
            in_channels if gamma_map else 0)
        self.conv_in = conv3x3(conv_in_channels * patch_size**2, channels, convolutions=convolutions, **common)

        # Down path; ``skip_channels`` records the width of every skip tensor.
        ch = channels
        skip_channels = [ch]
        down_blocks, down_attns, downsamples = [], [], []
        for level, mult in enumerate(channel_mult):
            out_ch = channels * mult
            for _ in range(num_res_blocks):
                down_blocks.append(res(ch, out_ch))
                down_attns.append(attn(out_ch, level))
                ch = out_ch
                skip_channels.append(ch)
            if level != num_levels - 1:
                downsamples.append(Downsample(ch, with_conv=resample_with_conv, convolutions=convolutions, **common))
                skip_channels.append(ch)
        self.down_blocks = nnx.List(down_blocks)
        self.down_attns = nnx.List(down_attns)
        self.downsamples = nnx.List(downsamples)

        self.mid_block1 = res(ch, ch)
        self.mid_attn = AttnBlock(ch, **common) if mid_attention else None
        self.mid_block2 = res(ch, ch)

        up_blocks, up_attns, upsamples = [], [], []
        for level in reversed(range(num_levels)):
            out_ch = channels * channel_mult[level]
            for _ in range(num_res_blocks + 1):
                up_blocks.append(res(ch + skip_channels.pop(), out_ch))
                up_attns.append(attn(out_ch, level))
                ch = out_ch
            if level != 0:
                upsamples.append(Upsample(ch, with_conv=resample_with_conv, convolutions=convolutions, **common))
        assert not skip_channels
        self.up_blocks = nnx.List(up_blocks)
        self.up_attns = nnx.List(up_attns)
        self.upsamples = nnx.List(upsamples)

        self.norm_out = group_norm(ch, **common)
        self.conv_out = conv3x3(ch, in_channels * patch_size**2, zero_init=True, convolutions=convolutions, **common)

    def __call__(self, z: Array, gamma: Array, cond: dict | None = None, *,
                 dropout_rng: Array | None = None) -> Array:
        """Predicts the noise ``eps`` from ``z [B, H, W, C]``, ``gamma [B]`` and ``cond``; float32 ``[B, H, W, C]``."""
        check_images(z, self.in_channels)
        factor = 2 ** (len(self.channel_mult) - 1) * self.patch_size
        if z.shape[1] % factor or z.shape[2] % factor:
            raise ValueError(
                f"MultiResUNet with patch_size {self.patch_size} and {len(self.channel_mult)} levels "
                f"halves the resolution {len(self.channel_mult) - 1} times, so H and W must be divisible by {factor}; "
                f"got {z.shape[1]}x{z.shape[2]}. Use fewer levels (shorter channel_mult) or pad the images."
            )
        cond = self.conditioning(gamma, cond, z.shape[0])
        res = nnx.remat(call_block) if self.remat else call_block
        num_blocks = len(self.down_blocks) + len(self.up_blocks) + 2
        keys = split_or_none(dropout_rng, 0, num_blocks)
        key_index = iter(range(num_blocks))

        def next_key() -> Array | None:
            i = next(key_index)
            return None if keys is None else keys[i]

        h = input_features(z, self.use_fourier, self.fourier_min, self.fourier_max)
        if self.gamma_range is not None:
            h = jnp.concatenate([h, gamma_map(gamma, z, *self.gamma_range)], axis=-1)
        h = space_to_depth(h, self.patch_size)
        h = self.conv_in(h.astype(self.dtype))
        hs = [h]
        blocks = iter(zip(self.down_blocks, self.down_attns))
        for level in range(len(self.channel_mult)):
            for _ in range(self.num_res_blocks):
                block, attn = next(blocks)
                h = res(block, h, cond, next_key())
                if attn is not None:
                    h = attn(h)
                hs.append(h)
            if level != len(self.channel_mult) - 1:
                h = self.downsamples[level](h)
                hs.append(h)

        h = res(self.mid_block1, h, cond, next_key())
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = res(self.mid_block2, h, cond, next_key())

        blocks = iter(zip(self.up_blocks, self.up_attns))
        upsamples = iter(self.upsamples)
        for level in reversed(range(len(self.channel_mult))):
            for _ in range(self.num_res_blocks + 1):
                block, attn = next(blocks)
                h = res(block, jnp.concatenate([h, hs.pop()], axis=-1), cond, next_key())
                if attn is not None:
                    h = attn(h)
            if level != 0:
                h = next(upsamples)(h)

        h = jax.nn.swish(self.norm_out(h))
        return depth_to_space(self.conv_out(h).astype(jnp.float32), self.patch_size)
