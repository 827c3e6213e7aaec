"""``optimal_transport``: flow matching's straight path as a schedule (Kingma & Gao 2023, App. D.3)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vdm.schedules import register
from vdm.schedules.base import _Endpoints, _WithEndpoints


@register("optimal_transport")
class OptimalTransport(_WithEndpoints):
    """The optimal-transport (rectified flow) path of flow matching as a schedule (Kingma & Gao 2023, App. D.3).

    The path z' = (1 - s) x + s eps has log SNR lambda = 2 log((1 - s) / s), so gamma = 2 log(s / (1 - s)).
    It reaches gamma = -inf and +inf at s = 0 and 1; pinned to [gamma_min, gamma_max], s runs over
    [s0, s1] = [sigmoid(gamma_min / 2), sigmoid(gamma_max / 2)], linearly in t:

        gamma(t) = 2 logit(s0 + (s1 - s0) t).

    With ``model.prediction = "o"`` (the path's velocity) and the ``flow_matching`` weighting, the weighted loss
    at t is (s1 - s0) ||o - o_hat||^2 (ds/dt = s1 - s0), so its expectation over t is flow matching's loss,
    the integral of ||o - o_hat||^2 over s, on [s0, s1].

    Args:
        gamma_min: gamma(0).
        gamma_max: gamma(1), above gamma_min.
        rngs: unused (nothing is learned).

    Call: ``t [B]`` -> ``gamma [B]``.
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
