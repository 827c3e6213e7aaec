"""The networks' convolution kernel: a 'SAME' convolution whose derivatives are fast on the CPU.

XLA:CPU runs a convolution fast only in the canonical layout its (YNNPACK/Eigen) kernels take:
NHWC input, HWIO kernel, NHWC output. The derivatives JAX writes for ``lax.conv_general_dilated``
are convolutions with other dimension labels (the weight gradient contracts over the batch, the
input gradient reads the kernel with its in/out channels swapped), which XLA:CPU leaves on a slow
generic kernel: 8 to 14x slower in the train step, inside ``lax.scan`` and outside it
(experiments/performance/README.md). For the convolutions the networks use -- NHWC/HWIO, stride 1
or 2, 'SAME' padding, an odd kernel, no dilation or groups -- :class:`Convolutions` writes the
derivatives itself, each as canonical convolutions (or matrix products) with explicit transposes.
For ``y = x (*) w`` (cross-correlation, 'SAME', stride 1) and an output cotangent ``g``:

* input gradient:  ``dx = g (*) flip(w)^T``, the kernel flipped in space, in/out channels swapped;
* weight gradient: ``dw[i, j] = sum_{b, p} x[b, p + (i, j) - (kh, kw) // 2] g[b, p]``, either
  as a convolution with the input channels as batch and the batch as features
  (``[C_in, H, W, B] (*) [H, W, B, C_out]``, the "conv" form) or as one matrix product
  ``x^T [C_in, B H W] @ shifted g [B H W, C_out]`` per kernel tap (the "matmul" form);
* stride 2: the stride-1 convolution read at every second pixel from an offset, so its
  derivatives are the stride-1 ones of ``g`` spread onto that grid (zeros between).

Both modes of differentiation work: the fast convolution is a ``jax.custom_jvp``. Its tangent is

* ``B_x^T dx + B_w^T dw``, the linear transposes of the two backward maps ``B_x: g -> dx`` and
  ``B_w: g -> dw`` above (built by ``jax.linear_transpose``, rematerialised so that the residuals
  are ``x`` and ``w``). ``jax.grad`` transposes them back, so the backward pass holds exactly
  ``B_x`` and ``B_w``: the canonical convolutions of a hand-written VJP;
* the convolution itself, ``dx (*) w``, when the kernel's tangent is known to be zero (a
  derivative in the input alone: the ODE likelihood's divergence, any ``jax.jvp`` in the data):
  one canonical convolution, as ``lax``'s own jvp. (``B_x^T dx`` is the same map, but it reads the
  kernel with in and out swapped, which XLA:CPU runs on its slow generic kernel inside loops:
  6.8x slower for a scanned U-Net.) Under ``jax.grad`` in the input alone, which the trainer
  never takes, its transpose is XLA's own input gradient: right, not fast.

A tangent known to be zero (the data's in a gradient) costs nothing.

Which gradient is taken is a setting of the network, fixed when it is built: a
:class:`Convolutions` value (frozen, hashable) is the ``conv_general_dilated`` of every
``nnx.Conv`` and lives in the network's graphdef. ``"auto"`` resolves by backend when traced:
the custom derivatives on ``CUSTOM_GRADIENT_BACKENDS``, XLA's own elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from vdm import options

Array = jax.Array

GRADIENTS = ("auto", "custom", "plain")  # Convolutions.gradient
WEIGHT_GRADIENTS = ("auto", "conv", "matmul")  # Convolutions.weight_gradient


def check_options(*, convolution_gradient: str, weight_gradient: str) -> None:
    """The one check of the setting (``vdm.options.OptionError``, named as the config's ``model`` fields)."""
    options.choice("convolution_gradient", convolution_gradient, dict.fromkeys(GRADIENTS))
    options.choice("weight_gradient", weight_gradient, dict.fromkeys(WEIGHT_GRADIENTS))

# Backends on which gradient="auto" takes the custom derivatives: measured 8 to 14x faster than
# XLA's own gradient convolutions in the CPU train step (experiments/performance/README.md).
# Elsewhere (GPU, TPU) the reason for them, XLA:CPU's slow generic kernel, does not exist, and the
# stride-2 gradient costs 4x the FLOPs of XLA's: those take XLA's own gradient until a measurement
# says otherwise (``experiments/performance/ab.py --variant custom=model.convolution_gradient=custom
# --variant plain=model.convolution_gradient=plain``).
CUSTOM_GRADIENT_BACKENDS = ("cpu",)

_NHWC = ("NHWC", "HWIO", "NHWC")


def _same_padding(kernel_shape: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    kh, kw = kernel_shape[:2]
    return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def _nhwc_conv(x: Array, w: Array, padding, precision, strides=(1, 1)) -> Array:
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, precision=precision)


def _input_gradient(w: Array, g: Array, precision) -> Array:
    """d/dx of a stride-1 'SAME' convolution: correlate ``g`` with the flipped kernel, in/out swapped."""
    return _nhwc_conv(g, jnp.flip(w, (0, 1)).swapaxes(2, 3), _same_padding(w.shape), precision)


def _weight_gradient(x: Array, g: Array, kernel_shape, precision, form: str) -> Array:
    """d/dw of a stride-1 'SAME' convolution, ``[kh, kw, C_in, C_out]``, in ``form`` (``conv`` | ``matmul``)."""
    kh, kw = kernel_shape[:2]
    (_, h, w_, c), o = x.shape, g.shape[-1]
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


def _spread(g: Array, x_shape, kernel_shape) -> Array:
    """A stride-2 'SAME' output (cotangent) onto the input's grid: ``g`` at every second pixel from
    the offset ``kernel // 2 - low`` (``low``: the strided padding's low side), zeros between."""
    offsets = []
    for size, k, out in zip(x_shape[1:3], kernel_shape[:2], g.shape[1:3]):
        low = max((out - 1) * 2 + k - size, 0) // 2
        offsets.append(k // 2 - low)
    # A scatter, not lax.pad's interior padding: XLA folds the latter into the convolution's padding,
    # which changes the float rounding of the gradient.
    return jnp.zeros(tuple(x_shape[:3]) + g.shape[-1:], g.dtype).at[:, offsets[0]::2, offsets[1]::2].set(g)


def _backward(x: Array, w: Array, g: Array, stride: int, precision, form: str) -> tuple[Array, Array]:
    """(dx, dw) of ``_fast_conv`` for the output cotangent ``g``: canonical convolutions only."""
    if stride == 2:
        g = _spread(g, x.shape, w.shape)
    return _input_gradient(w, g, precision), _weight_gradient(x, g, w.shape, precision, form).astype(w.dtype)


def _forward(x: Array, w: Array, stride: int, precision) -> Array:
    """The 'SAME' NHWC/HWIO convolution of stride 1 or 2 (one canonical convolution)."""
    padding = _same_padding(w.shape) if stride == 1 else "SAME"
    return _nhwc_conv(x, w, padding, precision, (stride, stride))


@partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _fast_conv(x: Array, w: Array, stride: int, precision, form: str) -> Array:
    """:func:`_forward`, whose derivatives are the canonical convolutions of :func:`_backward`."""
    return _forward(x, w, stride, precision)


@partial(_fast_conv.defjvp, symbolic_zeros=True)
def _fast_conv_jvp(stride, precision, form, primals, tangents):
    x, w = primals
    dx, dw = tangents
    y = _fast_conv(x, w, stride, precision, form)
    if isinstance(dw, SymbolicZero):  # in the input alone: the convolution itself (see the module's docstring)
        return y, _forward(dx, w, stride, precision)
    out = jax.ShapeDtypeStruct(y.shape, y.dtype)
    nonzero = (not isinstance(dx, SymbolicZero), True)

    # B_x^T dx + B_w^T dw, rematerialised: under jax.grad the residuals are x and w alone, and the
    # kernel flips and input transposes of B_x, B_w happen in the backward pass, as in a hand-written VJP.
    @partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
    def tangent(x, w, *ts):
        maps = [lambda g, i=i: _backward(x, w, g, stride, precision, form)[i] for i in (0, 1) if nonzero[i]]
        terms = [jax.linear_transpose(b, out)(t)[0] for b, t in zip(maps, ts)]
        return sum(terms[1:], terms[0])

    return y, tangent(x, w, *(t for t, n in zip(tangents, nonzero) if n))


@dataclasses.dataclass(frozen=True)
class Convolutions:
    """``lax.conv_general_dilated`` with the derivatives of this module where they are fast.

    Pass it as ``nnx.Conv(..., conv_general_dilated=Convolutions(...))``; it is called with
    ``lax.conv_general_dilated``'s signature and computes the same values.

    Attributes:
      gradient: ``"custom"`` (this module's derivatives, on every backend), ``"plain"``
        (``lax.conv_general_dilated`` and XLA's own derivatives) or ``"auto"`` (custom on
        ``CUSTOM_GRADIENT_BACKENDS``, plain elsewhere, decided when traced).
      weight_gradient: the custom weight gradient's form, ``"conv"``, ``"matmul"`` or ``"auto"``:
        the matrix products on the CPU for images of at least 28 x 28 pixels and 32 channels in
        and out, where they measured faster in the train step (0.76x the step time of the paper's
        CIFAR-10 net at 4 blocks, 0.96x at 32 channels on MNIST), the convolution elsewhere (the
        demo's 14 x 14 levels: 1.15x slower as products); see experiments/performance/README.md.
    """

    gradient: str = "auto"
    weight_gradient: str = "auto"

    def __post_init__(self):
        check_options(convolution_gradient=self.gradient, weight_gradient=self.weight_gradient)

    def uses_custom_gradient(self, backend: str | None = None) -> bool:
        """Whether a convolution traced on ``backend`` (default: JAX's default backend) takes the custom derivatives."""
        if self.gradient == "auto":
            return (backend or jax.default_backend()) in CUSTOM_GRADIENT_BACKENDS
        return self.gradient == "custom"

    def resolved_weight_gradient(self, input_shape: Sequence[int], out_channels: int) -> str:
        """``conv`` or ``matmul``: the form of the weight gradient for an input ``[B, H, W, C_in]``."""
        if self.weight_gradient != "auto":
            return self.weight_gradient
        _, h, w, c = input_shape
        large = min(c, out_channels) >= 32 and h * w >= 28 * 28
        return "matmul" if jax.default_backend() == "cpu" and large else "conv"

    def __call__(
        self,
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
        stride = _fast_stride(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                              feature_group_count, batch_group_count, preferred_element_type, out_sharding)
        if stride and self.uses_custom_gradient():
            form = self.resolved_weight_gradient(lhs.shape, rhs.shape[-1])
            return _fast_conv(lhs, rhs, stride, precision, form)
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
            out_sharding=out_sharding)


def _fast_stride(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                 feature_group_count, batch_group_count, preferred_element_type, out_sharding) -> int:
    """1 or 2 for a convolution ``_fast_conv`` computes (NHWC/HWIO, odd kernel, 'SAME' padding,
    no dilation, groups or output options; stride 1, or 2 with ``padding="SAME"``), else 0."""
    if lhs.ndim != 4 or rhs.ndim != 4 or rhs.shape[0] % 2 == 0 or rhs.shape[1] % 2 == 0:
        return 0
    plain = (all(d == 1 for d in (lhs_dilation or ())) and all(d == 1 for d in (rhs_dilation or ()))
             and feature_group_count == 1 and batch_group_count == 1 and preferred_element_type is None
             and out_sharding is None
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    strides = tuple(window_strides)
    if plain and strides == (1, 1) and (padding == "SAME" or tuple(map(tuple, padding)) == _same_padding(rhs.shape)):
        return 1
    if plain and strides == (2, 2) and padding == "SAME":
        return 2
    return 0
