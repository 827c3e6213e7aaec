"""Building blocks shared by the VDM score networks.

The layers follow the score network of Variational Diffusion Models
(Kingma, Salimans, Poole & Ho, 2021, arXiv:2107.00630, appendix B and the
reference implementation ``google-research/vdm/model_vdm.py``), written with
Flax NNX.

Conventions used throughout ``vdm.nets``:

* Images are NHWC: ``[B, H, W, C]``; vectors are ``[B, D]``.
* ``gamma`` is ``-log SNR`` with shape ``[B]`` (or per element: see :func:`batch_gamma` and
  :func:`gamma_map`); networks condition on ``t = (gamma - gamma_min) / (gamma_max - gamma_min)``,
  which lies in ``[0, 1]`` for gammas inside the schedule's range.
* ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``), ``param_dtype`` the
  storage dtype of the parameters (``float32`` by default).
* Dropout is applied if and only if a PRNG key is passed; without a key every
  layer is deterministic.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from vdm import schedules

Array = jax.Array
DType = jnp.dtype | type

# Upper bound on GroupNorm groups, as in the VDM / DDPM U-Nets (linen default).
MAX_GROUPS = 32
# Fewest channels per GroupNorm group (see :func:`num_groups`).
MIN_GROUP_SIZE = 4
# GroupNorm epsilon of the VDM reference implementation (linen default).
GROUPNORM_EPS = 1e-6

zeros_init = nnx.initializers.zeros_init()


def normalize_gamma(gamma: Array, gamma_min: float, gamma_max: float) -> Array:
    """Maps ``gamma = -log SNR`` to ``t = (gamma - gamma_min) / (gamma_max - gamma_min)``.

    Args:
      gamma: ``[B]`` (or any shape) log-SNR values in ``[gamma_min, gamma_max]``.
      gamma_min: lower end of the schedule's gamma range (e.g. -13.3).
      gamma_max: upper end of the schedule's gamma range (e.g. 5.0).

    Returns:
      Array of the same shape with values in ``[0, 1]`` for in-range gammas. The range is
      checked where it is set (``vdm.schedules.check_endpoints``), not on every call.
    """
    return (gamma - gamma_min) / (gamma_max - gamma_min)


def batch_gamma(gamma: Array, batch_size: int) -> Array:
    """Returns ``gamma`` as a float32 ``[B]`` vector: a scalar is broadcast, and a per-element gamma
    ``[B, ...]`` becomes its mean over the elements of each example (the one noise level an embedding
    of the time can take; MuLAN conditions VDM's U-Net the same way, the map itself going in as input
    channels: :func:`gamma_map`)."""
    gamma = jnp.asarray(gamma, jnp.float32)
    if gamma.ndim == 0:
        return jnp.broadcast_to(gamma, (batch_size,))
    if gamma.shape[0] != batch_size:
        raise ValueError(f"gamma must be a scalar, [{batch_size}] or [{batch_size}, ...], got {gamma.shape}")
    if gamma.ndim > 1:
        return jnp.mean(jnp.reshape(gamma, (batch_size, -1)), axis=-1)
    return gamma


def gamma_map(gamma: Array, z: Array, gamma_min: float, gamma_max: float) -> Array:
    """The normalised gamma (:func:`normalize_gamma`) as a map of ``z``'s shape, to go in beside ``z`` as
    input channels: a per-element gamma as it is, a per-example one (or a scalar) broadcast."""
    gamma = jnp.asarray(gamma, jnp.float32)
    if gamma.ndim == 1:
        gamma = jnp.reshape(gamma, gamma.shape + (1,) * (z.ndim - 1))
    return jnp.broadcast_to(normalize_gamma(gamma, gamma_min, gamma_max), z.shape)


def timestep_embedding(t: Array, dim: int, *, scale: float = 1000.0, max_period: float = 10_000.0) -> Array:
    """Sinusoidal embedding of a (continuous) time, as in VDM / DDPM / Transformers.

    Mirrors ``get_timestep_embedding`` of the VDM reference code: with
    ``s = scale * t``, ``half = dim // 2`` and
    ``w_k = exp(-log(max_period) * k / (half - 1))`` for ``k = 0 .. half-1``,
    the embedding is ``[sin(s * w_0), ..., sin(s * w_{half-1}), cos(s * w_0), ...,
    cos(s * w_{half-1})]`` (zero padded by one entry when ``dim`` is odd).

    Args:
      t: ``[B]`` times; VDM uses the normalised gamma in ``[0, 1]``.
      dim: embedding size, at least 4.
      scale: multiplier applied to ``t`` first (VDM: 1000).
      max_period: longest period of the sinusoids.

    Returns:
      ``[B, dim]`` float32 embedding.
    """
    if t.ndim != 1:
        raise ValueError(f"t must have shape [B], got {t.shape}")
    if dim < 4:
        raise ValueError(f"embedding dim must be >= 4, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = (scale * t.astype(jnp.float32))[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def fourier_features(z: Array, n_min: int, n_max: int) -> Array:
    """Base-2 Fourier features of the input (VDM, appendix B / ``Base2FourierFeatures``).

    For ``n in {n_min, ..., n_max}`` (inclusive) the angular frequencies are
    ``w_n = 2**n * 2 * pi``.  Every channel ``c`` is repeated once per frequency
    and the features are ``concat([sin(w_n z_c) ...], [cos(w_n z_c) ...])``
    ordered channel-major, frequency-minor -- exactly the layout of the VDM
    reference code, whose default ``start=6, stop=8`` equals
    ``n_min=6, n_max=7`` here.

    Computed in float32 whatever the input dtype: at ``2**7 * 2 * pi`` the
    phase is far too large for bfloat16.

    Args:
      z: ``[..., C]`` input.
      n_min: lowest exponent.
      n_max: highest exponent (inclusive), ``>= n_min``.

    Returns:
      ``[..., 2 * C * (n_max - n_min + 1)]`` float32 features (not including ``z``).
    """
    if n_max < n_min:
        raise ValueError(f"need n_max >= n_min, got {n_min=} {n_max=}")
    z = z.astype(jnp.float32)
    num_freqs = n_max - n_min + 1
    w = 2.0 ** jnp.arange(n_min, n_max + 1, dtype=jnp.float32) * 2.0 * jnp.pi
    w = jnp.tile(w, z.shape[-1])  # [C * F], frequency index varies fastest
    h = jnp.repeat(z, num_freqs, axis=-1) * w
    return jnp.concatenate([jnp.sin(h), jnp.cos(h)], axis=-1)


def num_fourier_channels(in_channels: int, n_min: int, n_max: int) -> int:
    """Number of channels :func:`fourier_features` appends for ``in_channels`` inputs."""
    return 2 * in_channels * (n_max - n_min + 1)


def num_groups(channels: int) -> int:
    """GroupNorm groups for ``channels``: the largest divisor <= 32 leaving >= 4 channels per group.

    Returns 1 if no divisor qualifies. For the paper's widths (128, 256) this is VDM's 32 groups. Capping the
    number of groups matters for narrow networks: with one channel per group,
    GroupNorm removes every per-channel constant, including the additive
    gamma conditioning of :class:`ResnetBlock`, and the network would ignore
    gamma.
    """
    for groups in range(min(MAX_GROUPS, channels // MIN_GROUP_SIZE), 1, -1):
        if channels % groups == 0:
            return groups
    return 1


def group_norm(channels: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """GroupNorm over ``channels`` with :func:`num_groups` groups and epsilon 1e-6."""
    return nnx.GroupNorm(
        channels,
        num_groups=num_groups(channels),
        epsilon=GROUPNORM_EPS,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


_NHWC = ("NHWC", "HWIO", "NHWC")


def _same_padding(kernel_shape: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    kh, kw = kernel_shape[:2]
    return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def _nhwc_conv(x: Array, w: Array, padding, precision) -> Array:
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_NHWC, precision=precision)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _same_conv(x: Array, w: Array, precision) -> Array:
    return _nhwc_conv(x, w, _same_padding(w.shape), precision)


def _same_conv_fwd(x: Array, w: Array, precision):
    return _same_conv(x, w, precision), (x, w)


def _same_conv_bwd(precision, residuals, g):
    x, w = residuals
    pad = _same_padding(w.shape)
    # d/dx: correlate g with the spatially flipped kernel, in/out channels swapped.
    dx = _nhwc_conv(g, jnp.flip(w, (0, 1)).swapaxes(2, 3), pad, precision)
    return dx, _weight_gradient(x, g, w.shape, precision).astype(w.dtype)


def _weight_gradient(x: Array, g: Array, kernel_shape, precision) -> Array:
    """d/dw of a 'SAME' convolution: [kh, kw, C_in, C_out] from the input x and the output's gradient g.

    Two forms of the same sum over batch and pixels: a "convolution" with the input channels as
    batch and the batch as features ([C_in, H, W, B] (*) [H, W, B, C_out]), or one matrix product
    per kernel tap, x^T [C_in, B H W] times the shifted g. ``auto`` takes the products on the CPU
    for images of at least 28 x 28 pixels and 32 channels, where they measured faster in the train
    step (0.76x the step time of the paper's CIFAR-10 net at 4 blocks, 0.96x at 32 channels on
    MNIST) and the convolution elsewhere (the demo's 14 x 14 levels: 1.15x slower as products);
    see experiments/performance/README.md.
    """
    kh, kw = kernel_shape[:2]
    (b, h, w_, c), o = x.shape, g.shape[-1]
    form = _WEIGHT_GRADIENT[0]
    if form == "auto":
        form = "matmul" if jax.default_backend() == "cpu" and min(c, o) >= 32 and h * w_ >= 28 * 28 else "conv"
    if form == "matmul":
        ph, pw = kh // 2, kw // 2
        gp = jnp.pad(g, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
        xt = x.reshape(-1, c).T
        taps = [lax.dot(xt, gp[:, 2 * ph - i:2 * ph - i + h, 2 * pw - j:2 * pw - j + w_, :].reshape(-1, o),
                        precision=precision) for i in range(kh) for j in range(kw)]
        return jnp.stack(taps).reshape(kh, kw, c, o)
    # [C_in, H, W, B] (*) [H, W, B, C_out] -> [C_in, kh, kw, C_out].
    dw = _nhwc_conv(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), _same_padding(kernel_shape), precision)
    return dw.transpose(1, 2, 0, 3)


_same_conv.defvjp(_same_conv_fwd, _same_conv_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _same_conv_stride2(x: Array, w: Array, precision) -> Array:
    return lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=_NHWC, precision=precision)


def _same_conv_stride2_fwd(x: Array, w: Array, precision):
    return _same_conv_stride2(x, w, precision), (x, w)


def _same_conv_stride2_bwd(precision, residuals, g):
    """A stride-2 'SAME' convolution is the stride-1 one read at every second pixel, from an offset
    (kernel // 2 minus the strided padding's low side): so its gradients are the stride-1 ones of
    g spread onto that grid (zeros between), in the canonical layout of ``_same_conv_bwd``."""
    x, w = residuals
    offsets = []
    for size, k, out in zip(x.shape[1:3], w.shape[:2], g.shape[1:3]):
        low = max((out - 1) * 2 + k - size, 0) // 2
        offsets.append(k // 2 - low)
    spread = jnp.zeros(x.shape[:3] + g.shape[-1:], g.dtype).at[:, offsets[0]::2, offsets[1]::2].set(g)
    return _same_conv_bwd(precision, residuals, spread)


_same_conv_stride2.defvjp(_same_conv_stride2_fwd, _same_conv_stride2_bwd)


_WEIGHT_GRADIENT = ["auto"]  # the form of _weight_gradient: auto | conv | matmul (see weight_gradient_form)
_CONV_GRADIENT = ["auto"]  # whose gradient the 3x3 convolutions take: auto | custom | plain (see convolution_gradient)

# Backends on which "auto" takes the custom VJP: measured 8 to 14x faster than XLA's own gradient
# convolutions in the CPU train step (experiments/performance/README.md). Elsewhere (GPU, TPU) the
# reason for it, XLA:CPU's slow generic kernel, does not exist, and the stride-2 gradient costs 4x
# the FLOPs of XLA's: so those take XLA's own gradient until a measurement says otherwise
# (``experiments/performance/ab.py --variant custom=conv=custom --variant plain=conv=plain``).
CUSTOM_GRADIENT_BACKENDS = ("cpu",)


@contextlib.contextmanager
def _setting(cell: list, what: str, value: str, allowed: tuple[str, ...]):
    """Set ``cell[0] = value`` inside the block (restored after it), once ``value`` is allowed."""
    if value not in allowed:
        raise ValueError(f"{what} {value!r}: {', '.join(allowed)}")
    previous, cell[0] = cell[0], value
    try:
        yield
    finally:
        cell[0] = previous


def weight_gradient_form(form: str):
    """Trace the custom VJP's weight gradients in ``form`` (``conv``, ``matmul`` or ``auto``, the
    default) inside this block: for measuring the two forms against each other."""
    return _setting(_WEIGHT_GRADIENT, "weight gradient form", form, ("auto", "conv", "matmul"))


def convolution_gradient(form: str):
    """Trace :func:`conv_general_dilated` with ``form``'s gradient inside this block: ``custom``
    (the custom VJP on every backend), ``plain`` (``lax.conv_general_dilated`` and XLA's own
    gradient) or ``auto`` (the default: custom on ``CUSTOM_GRADIENT_BACKENDS``, plain elsewhere)."""
    return _setting(_CONV_GRADIENT, "convolution gradient", form, ("auto", "custom", "plain"))


def plain_convolutions():
    """Trace the networks' convolutions as plain ``lax.conv_general_dilated`` inside this block.

    A custom VJP cannot be differentiated in forward mode (``jax.jvp``), which the probability-
    flow ODE likelihood needs for its divergence; there the CPU-gradient fast path of
    ``conv_general_dilated`` is not wanted anyway (the likelihood takes no gradients).
    """
    return convolution_gradient("plain")


def uses_custom_gradient(backend: str | None = None) -> bool:
    """Whether :func:`conv_general_dilated` traced now takes the custom VJP on ``backend``
    (default: JAX's default backend), under the innermost :func:`convolution_gradient` block."""
    form = _CONV_GRADIENT[0]
    if form == "auto":
        return (backend or jax.default_backend()) in CUSTOM_GRADIENT_BACKENDS
    return form == "custom"


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> Array:
    """Drop-in ``lax.conv_general_dilated`` whose gradient is fast on the CPU.

    XLA:CPU only rewrites convolutions into the layout its fast (Eigen)
    kernels support in the top-level computation. The gradient convolutions
    JAX emits for a convolution inside ``lax.scan`` (as in the scanned
    ``ScoreUNet`` stages) are left with transposed dimension labels and run on
    a slow generic kernel: about 30x slower for a 3x3 conv on 28x28 images.
    For the case the score networks use -- NHWC/HWIO, stride 1, no dilation,
    no groups, 'SAME' padding with an odd kernel -- this function uses a
    custom VJP that writes both gradient convolutions in the canonical
    NHWC/HWIO form with explicit transposes (mathematically the same
    gradient); stride 2 with 'SAME' padding (the down-sampling convolutions)
    reuses it on the gradient spread onto the full-resolution grid. Every other configuration is forwarded to
    ``lax.conv_general_dilated`` unchanged, and so is everything on backends outside
    ``CUSTOM_GRADIENT_BACKENDS`` (see :func:`convolution_gradient`). Pass it to ``nnx.Conv(...,
    conv_general_dilated=conv_general_dilated)``.
    """
    kh, kw = rhs.shape[:2] if rhs.ndim == 4 else (0, 0)
    canonical = (
        lhs.ndim == 4
        and rhs.ndim == 4
        and kh % 2 == 1
        and kw % 2 == 1
        and all(d == 1 for d in (lhs_dilation or ()))
        and all(d == 1 for d in (rhs_dilation or ()))
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and out_sharding is None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    strides = tuple(window_strides)
    simple = canonical and strides == (1, 1) and (
        padding == "SAME" or tuple(map(tuple, padding)) == _same_padding(rhs.shape))
    strided_simple = canonical and strides == (2, 2) and padding == "SAME"
    if (simple or strided_simple) and uses_custom_gradient():
        return (_same_conv if simple else _same_conv_stride2)(lhs, rhs, precision)
    return lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        out_sharding=out_sharding,
    )


def conv3x3(
    in_channels: int,
    out_channels: int,
    *,
    stride: int = 1,
    zero_init: bool = False,
    dtype: DType,
    param_dtype: DType,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """3x3 'SAME' convolution (optionally stride 2 / zero-initialised kernel).

    Uses :func:`conv_general_dilated`, so its gradient is fast inside ``nnx.scan`` on CPU.
    """
    kwargs = {"kernel_init": zeros_init} if zero_init else {}
    conv = nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(3, 3),
        strides=(stride, stride),
        padding="SAME",
        conv_general_dilated=conv_general_dilated,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **kwargs,
    )
    conv.kernel = Kernel(conv.kernel[...])
    return conv


class Kernel(nnx.Param):
    """A weight matrix or convolution kernel: the parameters that get weight decay.

    Every dense and convolution layer of ``vdm.nets`` stores its kernel as this type
    (biases, norm scales, embeddings and the noise schedule stay plain ``nnx.Param``), so
    the optimizer chooses weight decay by type, whatever the path or the rank of the array.
    """


def dense(in_features: int, out_features: int, **kwargs) -> nnx.Linear:
    """``nnx.Linear`` whose kernel is a :class:`Kernel`."""
    layer = nnx.Linear(in_features, out_features, **kwargs)
    layer.kernel = Kernel(layer.kernel[...])
    return layer


class NoiseConditioning(nnx.Module):
    """The conditioning vector every network is built on: gamma and an optional class -> ``[B, out_dim]``.

    VDM (``ScoreUNet``): ``t = (gamma - gamma_min) / (gamma_max - gamma_min)``,
    ``emb = swish(Dense(swish(Dense(timestep_embedding(1000 t)))))``. With
    ``num_classes > 0`` a learned class embedding is added (Ho & Salimans 2022); its table
    has ``num_classes + 1`` rows, the last being the null class that classifier-free guidance
    uses for the unconditional prediction. ``cond=None`` means the null class for a
    conditional network and nothing at all for an unconditional one.

    Call: ``gamma [B]`` (or a scalar), ``cond`` (``None`` or ``{"label": int [B]}``),
    ``batch_size`` -> ``[B, out_dim]`` in the compute dtype.
    """

    def __init__(self, embed_dim: int, out_dim: int, *, gamma_min: float, gamma_max: float, num_classes: int = 0,
                 dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        schedules.check_endpoints(gamma_min, gamma_max)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.embed_dim = embed_dim
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        self.num_classes = num_classes
        self.dense0 = dense(embed_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense1 = dense(out_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.label_embedding = (
            nnx.Embed(num_classes + 1, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if num_classes else None
        )

    def __call__(self, gamma: Array, cond: dict | None, batch_size: int) -> Array:
        t = normalize_gamma(batch_gamma(gamma, batch_size), self.gamma_min, self.gamma_max)
        h = jax.nn.swish(self.dense0(timestep_embedding(t, self.embed_dim)))
        h = jax.nn.swish(self.dense1(h))
        if self.label_embedding is None:
            if cond is not None and cond.get("label") is not None:
                raise ValueError("this network was built with num_classes=0 and cannot take a class label")
            return h
        labels = jnp.full((batch_size,), self.num_classes, jnp.int32) if cond is None else cond["label"]
        return h + self.label_embedding(labels)


def call_block(block: nnx.Module, h: Array, cond: Array, dropout_rng: Array | None) -> Array:
    """``block(h, cond, dropout_rng)`` as a function of the module, for ``nnx.remat(call_block)``."""
    return block(h, cond, dropout_rng)


def input_channels(in_channels: int, with_fourier_features: bool, n_min: int, n_max: int) -> int:
    """Channels of :func:`input_features` for ``in_channels`` channels of ``z``."""
    return in_channels + (num_fourier_channels(in_channels, n_min, n_max) if with_fourier_features else 0)


def input_features(z: Array, with_fourier_features: bool, n_min: int, n_max: int) -> Array:
    """The U-Nets' input: ``z`` in float32, with its base-2 Fourier features appended when asked."""
    h = z.astype(jnp.float32)
    if with_fourier_features:
        h = jnp.concatenate([h, fourier_features(h, n_min, n_max)], axis=-1)
    return h


class ResnetBlock(nnx.Module):
    """VDM/DDPM residual block with additive conditioning.

    ``h = conv1(swish(GN(x))) + Dense(cond)``;
    ``h = conv2(dropout(swish(GN(h))))`` with ``conv2`` zero-initialised;
    returns ``shortcut(x) + h``, where the shortcut is a 1x1 projection
    (``nin_shortcut``) when the channel count changes, else the identity.
    As in the VDM code the conditioning projection has no bias and is
    zero-initialised, so every block is the identity at initialisation.

    Call: ``x [B, H, W, in_channels]``, ``cond [B, cond_dim]``, optional
    ``dropout_rng`` -> ``[B, H, W, out_channels]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        *,
        dropout: float,
        dtype: DType,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = group_norm(in_channels, **common)
        self.conv1 = conv3x3(in_channels, out_channels, **common)
        self.cond_proj = dense(cond_dim, out_channels, use_bias=False, kernel_init=zeros_init, **common)
        self.norm2 = group_norm(out_channels, **common)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels, zero_init=True, **common)
        self.nin_shortcut = dense(in_channels, out_channels, **common) if in_channels != out_channels else None

    def __call__(self, x: Array, cond: Array, dropout_rng: Array | None = None) -> Array:
        h = self.conv1(jax.nn.swish(self.norm1(x)))
        h = h + self.cond_proj(cond)[:, None, None, :]
        h = jax.nn.swish(self.norm2(h))
        h = self.dropout(h, deterministic=dropout_rng is None, rngs=dropout_rng)
        h = self.conv2(h)
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all ``H * W`` positions (VDM ``AttnBlock``).

    ``h = GN(x)``; ``q, k, v = Dense(h)``; ``a = softmax(q k^T / sqrt(C)) v``;
    returns ``x + proj_out(a)`` with ``proj_out`` zero-initialised (identity at
    init). The softmax is computed in float32 whatever the compute dtype.

    Call: ``x [B, H, W, C]`` -> ``[B, H, W, C]``.
    """

    def __init__(self, channels: int, *, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = group_norm(channels, **common)
        self.q = dense(channels, channels, **common)
        self.k = dense(channels, channels, **common)
        self.v = dense(channels, channels, **common)
        self.proj_out = dense(channels, channels, kernel_init=zeros_init, **common)

    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        h = self.norm(x).reshape(b, height * width, c)
        q, k, v = self.q(h), self.k(h), self.v(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        a = jnp.einsum("bqk,bkc->bqc", weights, v)
        return x + self.proj_out(a).reshape(b, height, width, c)
