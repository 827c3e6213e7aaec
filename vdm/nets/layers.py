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
* Convolutions are computed by the network's ``convolutions`` setting, a
  :class:`vdm.nets.kernels.Convolutions` fixed when the network is built (fast
  gradients on the CPU); layers are plain ``nnx.Linear`` / ``nnx.Conv``, whose
  ``kernel`` is what weight decay falls on (``vdm.weight_decay``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vdm.nets.kernels import Convolutions

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
    if gamma.ndim > 1:  # the mean as the first element plus the mean offset: exact for a constant map,
        flat = jnp.reshape(gamma, (batch_size, -1))  # whatever order XLA sums in (the embedding of
        first = flat[:, 0]  # the noise level amplifies a rounding error of the mean a thousandfold)
        return first + jnp.mean(flat - first[:, None], axis=-1)
    return gamma


def check_images(z: Array, in_channels: int) -> None:
    """An image network's input: ValueError unless ``z`` is ``[B, H, W, in_channels]``."""
    if z.ndim != 4 or z.shape[-1] != in_channels:
        raise ValueError(f"expected z of shape [B, H, W, {in_channels}], got {z.shape}")


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


def conv3x3(
    in_channels: int,
    out_channels: int,
    *,
    stride: int = 1,
    zero_init: bool = False,
    convolutions: Convolutions,
    dtype: DType,
    param_dtype: DType,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """3x3 'SAME' convolution (optionally stride 2 / zero-initialised kernel) computed by ``convolutions``.

    ``convolutions`` (:class:`vdm.nets.kernels.Convolutions`) is the network's convolution
    setting: with it the gradient is fast on the CPU, inside ``lax.scan`` too.
    """
    kwargs = {"kernel_init": zeros_init} if zero_init else {}
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(3, 3),
        strides=(stride, stride),
        padding="SAME",
        conv_general_dilated=convolutions,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **kwargs,
    )


class NoiseConditioning(nnx.Module):
    """The conditioning vector every network is built on: gamma and an optional class -> ``[B, out_dim]``.

    VDM (``UNet``): ``t = (gamma - gamma_min) / (gamma_max - gamma_min)``,
    ``emb = swish(Dense(swish(Dense(timestep_embedding(1000 t)))))``. With
    ``num_classes > 0`` a learned class embedding is added (Ho & Salimans 2022); its table
    has ``num_classes + 1`` rows, the last being the null class that classifier-free guidance
    uses for the unconditional prediction. ``cond=None`` means the null class for a
    conditional network and nothing at all for an unconditional one. With ``latent_size > 0`` a linear map of
    MuLAN's auxiliary latent ``cond["latent"]`` ``[B, latent_size]`` is added too (it is required then).

    Call: ``gamma [B]`` (or a scalar), ``cond`` (``None`` or ``{"label": int [B], "latent": [B, k]}``),
    ``batch_size`` -> ``[B, out_dim]`` in the compute dtype.
    """

    def __init__(self, embed_dim: int, out_dim: int, *, gamma_min: float, gamma_max: float, num_classes: int = 0,
                 latent_size: int = 0, dtype: DType, param_dtype: DType, rngs: nnx.Rngs):
        schedules.check_endpoints(gamma_min, gamma_max)
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.embed_dim = embed_dim
        self.gamma_min, self.gamma_max = gamma_min, gamma_max
        self.num_classes = num_classes
        self.dense0 = nnx.Linear(embed_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense1 = nnx.Linear(out_dim, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.label_embedding = (
            nnx.Embed(num_classes + 1, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if num_classes else None
        )
        self.latent_projection = (
            nnx.Linear(latent_size, out_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs) if latent_size else None
        )

    def __call__(self, gamma: Array, cond: dict | None, batch_size: int) -> Array:
        t = normalize_gamma(batch_gamma(gamma, batch_size), self.gamma_min, self.gamma_max)
        h = jax.nn.swish(self.dense0(timestep_embedding(t, self.embed_dim)))
        h = jax.nn.swish(self.dense1(h))
        if self.latent_projection is not None:
            if cond is None or cond.get("latent") is None:
                raise ValueError("this network was built with latent_size > 0: it needs cond['latent']")
            h = h + self.latent_projection(cond["latent"])
        if self.label_embedding is None:
            if cond is not None and cond.get("label") is not None:
                raise ValueError("this network was built with num_classes=0 and cannot take a class label")
            return h
        labels = cond.get("label") if cond is not None else None
        labels = jnp.full((batch_size,), self.num_classes, jnp.int32) if labels is None else labels
        return h + self.label_embedding(labels)


def split_or_none(rng: Array | None, index: int, num: int) -> Array | None:
    """``num`` dropout keys derived from ``fold_in(rng, index)``, or ``None`` without ``rng``."""
    if rng is None:
        return None
    return jax.random.split(jax.random.fold_in(rng, index), num)


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

    ``convolutions`` computes the 3x3 convolutions (see :func:`conv3x3`).

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
        convolutions: Convolutions,
        dtype: DType,
        param_dtype: DType,
        rngs: nnx.Rngs,
    ):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = group_norm(in_channels, **common)
        self.conv1 = conv3x3(in_channels, out_channels, convolutions=convolutions, **common)
        self.cond_proj = nnx.Linear(cond_dim, out_channels, use_bias=False, kernel_init=zeros_init, **common)
        self.norm2 = group_norm(out_channels, **common)
        self.dropout = nnx.Dropout(dropout)
        self.conv2 = conv3x3(out_channels, out_channels, zero_init=True, convolutions=convolutions, **common)
        self.nin_shortcut = nnx.Linear(in_channels, out_channels, **common) if in_channels != out_channels else None

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
        self.q = nnx.Linear(channels, channels, **common)
        self.k = nnx.Linear(channels, channels, **common)
        self.v = nnx.Linear(channels, channels, **common)
        self.proj_out = nnx.Linear(channels, channels, kernel_init=zeros_init, **common)

    def __call__(self, x: Array) -> Array:
        b, height, width, c = x.shape
        h = self.norm(x).reshape(b, height * width, c)
        q, k, v = self.q(h), self.k(h), self.v(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        a = jnp.einsum("bqk,bkc->bqc", weights, v)
        return x + self.proj_out(a).reshape(b, height, width, c)
