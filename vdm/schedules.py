"""Noise schedules gamma(t) = -log SNR(t), increasing on [0, 1].

Every schedule is a Flax NNX module called as ``gamma = schedule(t)`` (a schedule that declares ``conditioned``
is called as ``schedule(t, latent)``; ``bind`` fixes its latent) with t of shape
[B] (values in [0, 1]) and gamma of shape [B] -- or, for a schedule that declares
``elementwise = True``, of shape [B, *data_shape]: one schedule per element of the data (each
channel of each pixel), built with ``data_shape``. It satisfies gamma(0) = gamma_min and
gamma(1) = gamma_max (per element where it is per element), and declares them:
``schedule.endpoints()`` returns (gamma_min, gamma_max), fixed or learned, scalars or
[1, *data_shape], which the bound uses directly.
gamma'(t) is never written by hand: the loss takes it from ``jax.jvp``. Every schedule
also says what it learns: ``learns_endpoints`` (gamma_min / gamma_max are parameters) and
``learns_interior`` (the shape between them is; such a schedule exposes ``shape(t)``,
the normalised interior, for the variance-minimising gradient of VDM App. I.2).

| name            | gamma(t)                                               | learned            |
|-----------------|--------------------------------------------------------|--------------------|
| fixed_linear    | g0 + (g1 - g0) t                                       | nothing            |
| learned_linear  | g0 + (g1 - g0) t                                       | g0, g1             |
| monotone_net    | g0 + (g1 - g0) shape(t), shape a monotone network       | shape; g0, g1 opt. |
| cosine          | 2 log tan(a t + b), pinned to [g0, g1]                 | nothing            |
| shifted_cosine  | 2 log tan(a t + b) + shift, pinned to [g0, g1]         | nothing            |
| optimal_transport | 2 log(s / (1 - s)), s linear in t from s0 to s1 (g0, g1) | nothing          |
| per_pixel_polynomial | per element: g0_i + (g1_i - g0_i) P_i(t) / P_i(1), P_i' = (a_i t^2 + b_i t + c_i)^2 | a, b, c; g0_i, g1_i opt. |
| latent_polynomial | the same, a, b, c a network of a latent c of the input (MuLAN) | that network; g0_i, g1_i opt. |

Learned parameters are typed so that filters can pick them out: ``ScheduleEndpoint``
for g0 and g1, ``ScheduleShape`` for the interiors of ``monotone_net``, ``per_pixel_polynomial`` and
``latent_polynomial``. Both subclass
``nnx.Param`` (weight decay, ``vdm.weight_decay``, is for dense and convolution kernels only),
and the variance-minimising gradient (``vdm.model``, through
``diffusion.value_and_grad_with_schedule_variance``) treats ``ScheduleShape`` as the
interior. A new schedule is one class here plus its entry in ``SCHEDULES``.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import options, registry


class ScheduleEndpoint(nnx.Param):
    """A learned endpoint parameter of a noise schedule (gamma_min / gamma_max)."""


class ScheduleShape(nnx.Param):
    """A parameter of a schedule's interior shape (endpoints excluded)."""


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def check_endpoints(gamma_min: float, gamma_max: float) -> None:
    """The one check of a schedule's range: gamma_min < gamma_max (``vdm.options.OptionError`` if not).

    Every schedule runs it (through ``_Endpoints``), ``vdm.configlib.validate`` asks it for
    ``config.model.gamma_min`` / ``gamma_max``, and the networks, which normalise gamma by the
    same range, run it when built directly.
    """
    if not gamma_min < gamma_max:
        raise options.OptionError("gamma_min", gamma_min, f"must be below gamma_max={gamma_max}")


class _Endpoints(nnx.Module):
    """gamma_min and gamma_max, fixed numbers or learned with gamma_max > gamma_min kept; one pair, or one pair
    per element of ``shape`` (then returned as [1, *shape], the broadcast shape of ``vdm.diffusion``)."""

    def __init__(self, gamma_min: float, gamma_max: float, learned: bool, shape: tuple = ()):
        check_endpoints(gamma_min, gamma_max)
        self.learned = learned
        self.shape = tuple(shape)
        if learned:
            self.low = ScheduleEndpoint(jnp.full(self.shape, gamma_min, jnp.float32))
            # gamma_max = gamma_min + softplus(width): the order can never flip.
            self.width = ScheduleEndpoint(jnp.full(self.shape, _inverse_softplus(gamma_max - gamma_min), jnp.float32))
        else:
            self.fixed = (float(gamma_min), float(gamma_max))

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        if self.learned:
            low = self.low[...]
            low, high = low, low + jax.nn.softplus(self.width[...])
        else:
            low, high = jnp.float32(self.fixed[0]), jnp.float32(self.fixed[1])
        if self.shape:
            low, high = (jnp.broadcast_to(v, (1,) + self.shape) for v in (low, high))
        return low, high


class Linear(nnx.Module):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t; endpoints fixed or learned (VDM's learned linear)."""

    learns_interior = False

    def __init__(self, gamma_min: float, gamma_max: float, *, learn_endpoints: bool = False,
                 rngs: nnx.Rngs | None = None):
        self.endpoints = _Endpoints(gamma_min, gamma_max, learned=learn_endpoints)

    @property
    def learns_endpoints(self) -> bool:
        return self.endpoints.learned

    def __call__(self, t: jax.Array) -> jax.Array:
        low, high = self.endpoints()
        return low + (high - low) * t


class MonotoneNet(nnx.Module):
    """The learned monotone schedule of VDM (Kingma et al. 2021, App. H), endpoints pinned.

    The VDM network is h(t) = l1(t) + l3(phi(l2(t))) / H with positive weights,
    phi(x) = 2 (sigmoid(x) - 0.5), H hidden units, hence increasing. The original code
    uses h directly, so its endpoints drift wherever the optimiser takes them. Here the
    network only defines the *shape*

        shape(t) = (h(t) - h(0)) / (h(1) - h(0)),   shape(0) = 0, shape(1) = 1,

    and gamma(t) = gamma_min + (gamma_max - gamma_min) shape(t), with the endpoints
    fixed (``learn_endpoints=False``) or learned as two explicit scalars. Weights are
    kept positive by a softplus, so h is strictly increasing. As in VDM the linear part
    dominates at initialisation, so the initial schedule is close to linear.
    """

    learns_interior = True

    def __init__(self, gamma_min: float, gamma_max: float, *, hidden: int = 1024,
                 learn_endpoints: bool = True, rngs: nnx.Rngs):
        self.endpoints = _Endpoints(gamma_min, gamma_max, learned=learn_endpoints)
        self.hidden = hidden
        key1, key2, key3 = jax.random.split(rngs.params(), 3)
        self.slope = ScheduleShape(jnp.asarray(_inverse_softplus(gamma_max - gamma_min), jnp.float32))
        self.w2 = ScheduleShape(jax.random.normal(key1, (hidden,)))
        self.b2 = ScheduleShape(jax.random.normal(key2, (hidden,)))
        self.w3 = ScheduleShape(jax.random.normal(key3, (hidden,)))

    @property
    def learns_endpoints(self) -> bool:
        return self.endpoints.learned

    def _h(self, t: jax.Array) -> jax.Array:
        linear = jax.nn.softplus(self.slope[...]) * t
        hidden = jax.nn.softplus(self.w2[...]) * (2.0 * t[..., None] - 1.0) + self.b2[...]
        hidden = 2.0 * (jax.nn.sigmoid(hidden) - 0.5)
        return linear + hidden @ jax.nn.softplus(self.w3[...]) / self.hidden

    def shape(self, t: jax.Array) -> jax.Array:
        """The normalised interior: increasing, shape(0) = 0, shape(1) = 1."""
        h0, h1 = self._h(jnp.array([0.0, 1.0]))
        return (self._h(t) - h0) / (h1 - h0)

    def __call__(self, t: jax.Array) -> jax.Array:
        low, high = self.endpoints()
        return low + (high - low) * self.shape(t)


class ShiftedCosine(nnx.Module):
    """The cosine schedule in log-SNR form, shifted, with pinned endpoints.

    Cosine (Nichol & Dhariwal 2021): lambda(t) = -2 log tan(pi t / 2). Shifted cosine
    (Hoogeboom et al. 2023, "simple diffusion"): lambda(t) - shift, with
    shift = 2 log(resolution / 64) for images of that resolution (a base of 64).
    Pinned to [gamma_min, gamma_max] by truncating the curve:

        gamma(t) = 2 log tan(a t + b) + shift,
        b = arctan(exp((gamma_min - shift) / 2)),  a + b = arctan(exp((gamma_max - shift) / 2)).

    For angles above pi/4 it uses 2 log tan(theta) = -2 log tan(pi/2 - theta) with
    pi/2 - theta computed directly, so gamma stays accurate out to |gamma| = 20 in float32.
    """

    learns_endpoints = False
    learns_interior = False

    def __init__(self, gamma_min: float, gamma_max: float, *, shift: float = 0.0,
                 rngs: nnx.Rngs | None = None):
        self.endpoints = _Endpoints(gamma_min, gamma_max, learned=False)
        self.shift = float(shift)
        self.b = math.atan(math.exp(0.5 * (gamma_min - shift)))
        self.a = math.atan(math.exp(0.5 * (gamma_max - shift))) - self.b
        # pi/2 - b, computed without cancellation.
        self.c = math.atan(math.exp(-0.5 * (gamma_min - shift)))

    def __call__(self, t: jax.Array) -> jax.Array:
        theta = self.a * t + self.b
        phi = self.c - self.a * t  # = pi/2 - theta
        small = theta <= 0.25 * math.pi
        log_tan = jnp.where(small, jnp.log(jnp.tan(jnp.where(small, theta, 0.5))),
                            -jnp.log(jnp.tan(jnp.where(small, 0.5, phi))))
        return 2.0 * log_tan + self.shift


class Cosine(ShiftedCosine):
    """The cosine schedule (Nichol & Dhariwal 2021) in log-SNR form, pinned to [gamma_min, gamma_max]."""

    def __init__(self, gamma_min: float, gamma_max: float, *, rngs: nnx.Rngs | None = None):
        super().__init__(gamma_min, gamma_max, shift=0.0)


class OptimalTransport(nnx.Module):
    """The optimal-transport (rectified flow) path of flow matching as a schedule (Kingma & Gao 2023, App. D.3).

    The path z' = (1 - s) x + s eps has log SNR lambda = 2 log((1 - s) / s), so gamma = 2 log(s / (1 - s)).
    It reaches gamma = -inf and +inf at s = 0 and 1; pinned to [gamma_min, gamma_max], s runs over
    [s0, s1] = [sigmoid(gamma_min / 2), sigmoid(gamma_max / 2)], linearly in t:

        gamma(t) = 2 logit(s0 + (s1 - s0) t).

    With ``model.prediction = "o"`` (the path's velocity) and the ``flow_matching`` weighting, the weighted loss
    at t is (s1 - s0) ||o - o_hat||^2 (ds/dt = s1 - s0), so its expectation over t is flow matching's loss,
    the integral of ||o - o_hat||^2 over s, on [s0, s1].
    """

    learns_endpoints = False
    learns_interior = False

    def __init__(self, gamma_min: float, gamma_max: float, *, rngs: nnx.Rngs | None = None):
        self.endpoints = _Endpoints(gamma_min, gamma_max, learned=False)
        # s and 1 - s each as a sum of two positive terms: no cancellation near s = 0 or s = 1.
        self.s = tuple(1.0 / (1.0 + math.exp(-0.5 * g)) for g in (gamma_min, gamma_max))
        self.one_minus_s = tuple(1.0 / (1.0 + math.exp(0.5 * g)) for g in (gamma_min, gamma_max))

    def __call__(self, t: jax.Array) -> jax.Array:
        s = self.s[0] * (1.0 - t) + self.s[1] * t
        one_minus_s = self.one_minus_s[0] * (1.0 - t) + self.one_minus_s[1] * t
        return 2.0 * (jnp.log(s) - jnp.log(one_minus_s))


QUINTIC_SLACK = 1e-3  # d of ``monotone_quintic``: the slope left when a, b and c vanish


def monotone_quintic(a: jax.Array, b: jax.Array, c: jax.Array, t: jax.Array, data_rank: int) -> jax.Array:
    """P(t) + d t with P(t) = integral_0^t (a s^2 + b s + c)^2 ds, per element of the coefficients: increasing in t,
    0 at t = 0. ``t`` [B] (or [1]) is broadcast against coefficients of ``data_rank`` trailing data axes."""
    t = jnp.reshape(t, t.shape + (1,) * data_rank)
    poly = (((a * a / 5.0 * t + a * b / 2.0) * t + (b * b + 2.0 * a * c) / 3.0) * t + b * c) * t + c * c
    return poly * t + QUINTIC_SLACK * t


class PerPixelPolynomial(nnx.Module):
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

    @property
    def learns_endpoints(self) -> bool:
        return self.endpoints.learned

    def _p(self, t: jax.Array) -> jax.Array:
        return monotone_quintic(self.a[...], self.b[...], self.c[...], t, len(self.data_shape))

    def shape(self, t: jax.Array) -> jax.Array:
        """The normalised interior per element [B, *data_shape]: increasing, 0 at t = 0, 1 at t = 1."""
        return self._p(t) / self._p(jnp.ones((1,)))

    def __call__(self, t: jax.Array) -> jax.Array:
        low, high = self.endpoints()
        return low + (high - low) * self.shape(t)


class LatentPolynomial(nnx.Module):
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

    Call: ``schedule(t [B], latent [B, latent_size])`` -> ``gamma [B, *data_shape]`` (``conditioned``: the model
    binds the latent with ``bind``, which gives the ``t -> gamma`` callable the bound, samplers and ODE take).
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

    @property
    def learns_endpoints(self) -> bool:
        return self.endpoints.learned

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


class BoundToLatent(NamedTuple):
    """A schedule conditioned on a latent (``conditioned``), bound to one: the ``t -> gamma`` callable, with the
    schedule's ``endpoints()``."""

    schedule: nnx.Module
    latent: jax.Array

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.schedule(t, self.latent)

    def endpoints(self):
        return self.schedule.endpoints()


def bind(schedule, latent: jax.Array | None):
    """``t -> gamma`` of ``schedule``: itself, or for a schedule conditioned on a latent, bound to ``latent``."""
    if not getattr(schedule, "conditioned", False):
        return schedule
    if latent is None:
        raise ValueError("this schedule is conditioned on a latent (model.latent_size > 0): it needs one")
    return BoundToLatent(schedule, latent)


SCHEDULES = {
    "fixed_linear": functools.partial(Linear, learn_endpoints=False),
    "learned_linear": functools.partial(Linear, learn_endpoints=True),
    "monotone_net": MonotoneNet,
    "cosine": Cosine,
    "shifted_cosine": ShiftedCosine,
    "optimal_transport": OptimalTransport,
    "per_pixel_polynomial": PerPixelPolynomial,
    "latent_polynomial": LatentPolynomial,
}


def build(name: str, *, gamma_min: float, gamma_max: float, rngs: nnx.Rngs | None = None,
          data_shape: tuple | None = None, latent_size: int = 0, **kwargs) -> nnx.Module:
    """The schedule called ``name`` with endpoints [gamma_min, gamma_max]; an element-wise one (``elementwise``)
    gets ``data_shape``, the shape of one example, and one conditioned on a latent (``conditioned``) its
    ``latent_size``."""
    cls = registry.lookup(SCHEDULES, name, "schedule")
    if rngs is None:
        rngs = nnx.Rngs(0)
    if getattr(cls, "elementwise", False):
        if data_shape is None:
            raise ValueError(f"schedule {name!r} is per element: it needs data_shape")
        kwargs["data_shape"] = data_shape
    if getattr(cls, "conditioned", False):
        if not latent_size:
            raise options.OptionError("latent_size", latent_size, f"schedule {name!r} is conditioned on an auxiliary "
                                      "latent: set model.latent_size > 0")
        kwargs["latent_size"] = latent_size
    try:
        return cls(gamma_min, gamma_max, rngs=rngs, **kwargs)
    except TypeError as e:
        raise ValueError(f"schedule {name!r}: {e}") from None
