"""The monotone quintic schedules per element: ``per_pixel_polynomial`` (free coefficients) and
``latent_polynomial`` (MuLAN's: coefficients from a network of an auxiliary latent)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import options
from vdm.schedules import register
from vdm.schedules.base import ScheduleShape, _Endpoints, _WithEndpoints

QUINTIC_SLACK = 1e-3  # d of ``monotone_quintic``: the slope left when a, b and c vanish


def monotone_quintic(a: jax.Array, b: jax.Array, c: jax.Array, t: jax.Array, data_rank: int) -> jax.Array:
    """P(t) + d t with P(t) = integral_0^t (a s^2 + b s + c)^2 ds, per element of the coefficients: increasing in t,
    0 at t = 0.

    Args:
        a, b, c: the coefficients, each [..., *data_shape] (``data_rank`` trailing data axes).
        t: times [B] (or [1]), broadcast against the coefficients.
        data_rank: the number of trailing data axes of the coefficients.

    Returns:
        P(t) + d t, d = ``QUINTIC_SLACK``, of the broadcast shape of ``t`` [B, 1, ...] and the coefficients.
    """
    t = jnp.reshape(t, t.shape + (1,) * data_rank)
    poly = (((a * a / 5.0 * t + a * b / 2.0) * t + (b * b + 2.0 * a * c) / 3.0) * t + b * c) * t + c * c
    return poly * t + QUINTIC_SLACK * t


@register("per_pixel_polynomial")
class PerPixelPolynomial(_WithEndpoints):
    """A learned schedule per element of the data (each channel of each pixel), not conditioned on the input.

    For element i, with its own endpoints g0_i < g1_i (learned, or all fixed at gamma_min, gamma_max):

        gamma_i(t) = g0_i + (g1_i - g0_i) shape_i(t),   shape_i(t) = (P_i(t) + d t) / (P_i(1) + d),
        P_i(t) = integral_0^t (a_i s^2 + b_i s + c_i)^2 ds
               = a^2 t^5 / 5 + a b t^4 / 2 + (b^2 + 2 a c) t^3 / 3 + b c t^2 + c^2 t,

    so shape_i is increasing (its derivative is a square plus d > 0), shape_i(0) = 0, shape_i(1) = 1.
    This is the monotone degree-5 polynomial of MuLAN (Sahoo et al. 2024), whose coefficients there come
    from a network of an auxiliary latent; here they are free parameters per element. Why a polynomial:
    the derivative, which the continuous-time loss needs, is exact and cheap per element (no network per
    pixel), and five degrees of freedom per element bend the curve enough for a learned interior.
    ``d`` (``QUINTIC_SLACK``, 1e-3) keeps the curve strictly increasing when a, b and c vanish. Initialised at
    a = b = 0, c = 1 and both endpoints at [gamma_min, gamma_max]: every element then follows ``learned_linear``'s
    line.

    Args:
        gamma_min: gamma(0) of every element (its initial value if learned).
        gamma_max: gamma(1) of every element (likewise); above gamma_min.
        data_shape: the shape of one example.
        learn_endpoints: g0_i and g1_i are ``ScheduleEndpoint`` parameters.
        rngs: unused (the initial values are fixed).

    Call: ``t [B]`` -> ``gamma [B, *data_shape]``.
    """

    elementwise = True
    learns_interior = True

    def __init__(self, gamma_min: float, gamma_max: float, *, data_shape: tuple, learn_endpoints: bool = True,
                 rngs: nnx.Rngs | None = None):
        self.data_shape = tuple(int(n) for n in data_shape)
        self.endpoints = _Endpoints(gamma_min, gamma_max, learned=learn_endpoints, shape=self.data_shape)
        self.a = ScheduleShape(jnp.zeros(self.data_shape, jnp.float32))
        self.b = ScheduleShape(jnp.zeros(self.data_shape, jnp.float32))
        self.c = ScheduleShape(jnp.ones(self.data_shape, jnp.float32))

    def _p(self, t: jax.Array) -> jax.Array:
        return monotone_quintic(self.a[...], self.b[...], self.c[...], t, len(self.data_shape))

    def shape(self, t: jax.Array) -> jax.Array:
        """The normalised interior per element [B, *data_shape]: increasing, 0 at t = 0, 1 at t = 1."""
        return self._p(t) / self._p(jnp.ones((1,)))

    def __call__(self, t: jax.Array) -> jax.Array:
        low, high = self.endpoints()
        return low + (high - low) * self.shape(t)


@register("latent_polynomial", example={"kwargs": {"hidden": 8}})
class LatentPolynomial(_WithEndpoints):
    """MuLAN's schedule (Sahoo et al. 2024): per element and conditioned on an auxiliary latent c of the input.

    gamma_i(c, t) = g0_i + (g1_i - g0_i) (P_i(t) + d t) / (P_i(1) + d),   P_i' = (a_i(c) t^2 + b_i(c) t + c_i(c))^2,

    ``per_pixel_polynomial``'s monotone quintic (``monotone_quintic``) with its coefficients given by a network
    of c (two swish layers of width ``hidden``, then one linear map to the 3 coefficients of every element), as
    MuLAN's ``poly_fixedend`` schedule does; all of its parameters are ``ScheduleShape``. The endpoints g0_i,
    g1_i are learned per element but not conditioned on c (MuLAN fixes them at gamma_min, gamma_max:
    ``learn_endpoints=False``), so the prior and reconstruction terms see per-element endpoints that are the same
    for every input. Why this form: the quintic's derivative is exact and cheap per element, and a network of c
    makes the whole curve, interior and all, adapt to the input, which is MuLAN's point. The last layer starts at
    zero with biases a = b = 0, c = 1: at initialisation every element of every input follows ``learned_linear``'s
    line.

    Args:
        gamma_min: gamma(0) of every element (its initial value if learned).
        gamma_max: gamma(1) of every element (likewise); above gamma_min.
        data_shape: the shape of one example.
        latent_size: the size of the latent c (> 0).
        hidden: the width of the network's two swish layers (> 0).
        learn_endpoints: g0_i and g1_i are ``ScheduleEndpoint`` parameters.
        rngs: draws the first two layers' weights (``nnx.Rngs(0)`` if None).

    Call: ``schedule(t [B], latent [B, latent_size])`` -> ``gamma [B, *data_shape]`` (``conditioned``: the model
    binds the latent with ``bind``, which gives the ``t -> gamma`` callable the bound, samplers and ODE take).

    Raises:
        vdm.options.OptionError: ``latent_size`` or ``hidden`` is not a positive integer.
    """

    elementwise = True
    learns_interior = True
    conditioned = True  # gamma depends on an auxiliary latent: schedule(t, latent)

    def __init__(self, gamma_min: float, gamma_max: float, *, data_shape: tuple, latent_size: int, hidden: int = 128,
                 learn_endpoints: bool = True, rngs: nnx.Rngs | None = None):
        options.positive_int("latent_size", latent_size)
        options.positive_int("hidden", hidden)
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.data_shape = tuple(int(n) for n in data_shape)
        self.endpoints = _Endpoints(gamma_min, gamma_max, learned=learn_endpoints, shape=self.data_shape)
        n = math.prod(self.data_shape)
        init = nnx.initializers.lecun_normal()
        # Written out (not nnx.Linear) so that all of it is ScheduleShape: the interior, without weight decay.
        self.w0 = ScheduleShape(init(rngs.params(), (latent_size, hidden)))
        self.b0 = ScheduleShape(jnp.zeros((hidden,)))
        self.w1 = ScheduleShape(init(rngs.params(), (hidden, hidden)))
        self.b1 = ScheduleShape(jnp.zeros((hidden,)))
        self.w2 = ScheduleShape(jnp.zeros((hidden, 3 * n)))
        self.b2 = ScheduleShape(jnp.concatenate([jnp.zeros((2 * n,)), jnp.ones((n,))]))  # a, b, c of every element

    def _coefficients(self, latent: jax.Array):
        h = jax.nn.swish(latent @ self.w0[...] + self.b0[...])
        h = jax.nn.swish(h @ self.w1[...] + self.b1[...])
        abc = (h @ self.w2[...] + self.b2[...]).reshape((latent.shape[0], 3) + self.data_shape)
        return abc[:, 0], abc[:, 1], abc[:, 2]

    def shape(self, t: jax.Array, latent: jax.Array) -> jax.Array:
        """The normalised interior per element [B, *data_shape] for the latents [B, latent_size]: increasing,
        0 at t = 0, 1 at t = 1."""
        a, b, c = self._coefficients(latent)
        rank = len(self.data_shape)
        return monotone_quintic(a, b, c, t, rank) / monotone_quintic(a, b, c, jnp.ones((1,)), rank)

    def __call__(self, t: jax.Array, latent: jax.Array) -> jax.Array:
        low, high = self.endpoints()
        return low + (high - low) * self.shape(t, latent)
