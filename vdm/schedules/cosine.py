"""``cosine`` and ``shifted_cosine``: the cosine schedule in log-SNR form, pinned to [gamma_min, gamma_max]."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vdm.schedules import register
from vdm.schedules.base import _Endpoints, _WithEndpoints


class ShiftedCosine(_WithEndpoints):
    """The cosine schedule in log-SNR form, shifted, with pinned endpoints.

    Cosine (Nichol & Dhariwal 2021): lambda(t) = -2 log tan(pi t / 2). Shifted cosine
    (Hoogeboom et al. 2023, "simple diffusion"): lambda(t) - shift, with
    shift = 2 log(resolution / 64) for images of that resolution (a base of 64).
    Pinned to [gamma_min, gamma_max] by truncating the curve:

        gamma(t) = 2 log tan(a t + b) + shift,
        b = arctan(exp((gamma_min - shift) / 2)),  a + b = arctan(exp((gamma_max - shift) / 2)).

    For angles above pi/4 it uses 2 log tan(theta) = -2 log tan(pi/2 - theta) with
    pi/2 - theta computed directly, so gamma stays accurate out to |gamma| = 20 in float32.

    Args:
        gamma_min: gamma(0).
        gamma_max: gamma(1), above gamma_min.
        shift: added to gamma (2 log(resolution / 64)).
        rngs: unused (nothing is learned).

    Call: ``t [B]`` -> ``gamma [B]``.
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
    """The cosine schedule (Nichol & Dhariwal 2021) in log-SNR form, pinned to [gamma_min, gamma_max].

    Args:
        gamma_min: gamma(0).
        gamma_max: gamma(1), above gamma_min.
        rngs: unused (nothing is learned).

    Call: ``t [B]`` -> ``gamma [B]``.
    """

    def __init__(self, gamma_min: float, gamma_max: float, *, rngs: nnx.Rngs | None = None):
        super().__init__(gamma_min, gamma_max, shift=0.0)


# cosine first: the order of the table (and of the names an error lists)
register("cosine")(Cosine)
register("shifted_cosine")(ShiftedCosine)
