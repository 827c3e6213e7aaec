"""The InceptionV3 network of FID up to pool3, as pytorch-fid ports it (``vdm.inception`` has the weights and
the features; this module is the network alone, layer for layer with the state dict's names).

Input ``x [B, H, W, 3]`` in [-1, 1] (``vdm.inception.preprocess``), H and W at least 75; output ``[B, 2048]``.
BatchNorm in inference mode with eps ``BN_EPS``; the FID variants of the blocks as ``vdm.inception``'s docstring
lists them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

BN_EPS = 1e-3



def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class ConvBN(nnx.Module):
    """torchvision's ``BasicConv2d``: convolution without bias, BatchNorm (running statistics), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel, *, stride: int = 1, padding=0, rngs: nnx.Rngs):
        (ph, pw) = _pair(padding)
        self.conv = nnx.Conv(in_channels, out_channels, _pair(kernel), strides=stride, padding=((ph, ph), (pw, pw)),
                             use_bias=False, precision=lax.Precision.HIGHEST, rngs=rngs)
        self.bn = nnx.BatchNorm(out_channels, use_running_average=True, epsilon=BN_EPS, rngs=rngs)

    def __call__(self, x):
        return jax.nn.relu(self.bn(self.conv(x)))


def _chain(x, *layers):
    for layer in layers:
        x = layer(x)
    return x


def max_pool(x, stride: int, padding: int = 0):
    """3 x 3 max pool (padding with -inf)."""
    return nnx.max_pool(x, (3, 3), (stride, stride), ((padding, padding), (padding, padding)))


def avg_pool_valid(x):
    """3 x 3 average pool, stride 1, padding 1, over the pixels inside the image only (TF's, count_include_pad=False)."""
    return nnx.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nnx.Module):
    """Mixed_5b-d: pytorch-fid's ``FIDInceptionA``."""

    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = ConvBN(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = ConvBN(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                                self.branch_pool(avg_pool_valid(x))], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a: 35 x 35 -> 17 x 17."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([self.branch3x3(x),
                                _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                                max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b-e: pytorch-fid's ``FIDInceptionC`` (factorised 1 x 7 / 7 x 1 convolutions)."""

    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        self.branch1x1 = ConvBN(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = ConvBN(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            self.branch1x1(x), _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
            _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                   self.branch7x7dbl_5),
            self.branch_pool(avg_pool_valid(x))], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a: 17 x 17 -> 8 x 8."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = ConvBN(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([
            _chain(x, self.branch3x3_1, self.branch3x3_2),
            _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
            max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b (``FIDInceptionE_1``: valid-pixel average pool) and Mixed_7c (``FIDInceptionE_2``: max pool)."""

    def __init__(self, in_channels: int, *, max_pool_branch: bool, rngs: nnx.Rngs):
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = ConvBN(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = ConvBN(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        d3 = _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        pooled = max_pool(x, 1, padding=1) if self.max_pool_branch else avg_pool_valid(x)
        return jnp.concatenate([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                                self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3), self.branch_pool(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
    """InceptionV3 up to pool3, as pytorch-fid's ``fid_inception_v3()`` (without the classifier).

    Call: ``x [B, H, W, 3]`` in [-1, 1] (``preprocess``), H and W at least 75 -> ``[B, 2048]``.
    """

    def __init__(self, *, rngs: nnx.Rngs):
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True, rngs=rngs)

    def blocks(self, x) -> list[jax.Array]:
        """pytorch-fid's four output blocks: after the first max pool (64 channels), the second
        (192), Mixed_6e (768, before the aux classifier) and the last Inception block (2048, before pool3)."""
        b0 = max_pool(_chain(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3), 2)
        b1 = max_pool(_chain(b0, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3), 2)
        b2 = _chain(b1, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                    self.Mixed_6d, self.Mixed_6e)
        return [b0, b1, b2, _chain(b2, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)]

    def __call__(self, x):
        return jnp.mean(self.blocks(x)[-1], axis=(1, 2))  # pool3: the global average pool
