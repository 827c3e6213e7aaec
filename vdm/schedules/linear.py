"""The linear schedule: ``fixed_linear`` and ``learned_linear`` (VDM's), one class with its endpoints fixed or learned."""
from __future__ import annotations

import functools

import jax
from flax import nnx

from vdm.schedules import register
from vdm.schedules.base import _Endpoints, _WithEndpoints


class Linear(_WithEndpoints):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t; endpoints fixed or learned (VDM's learned linear).

    Args:
        gamma_min: gamma(0) (its initial value if learned).
        gamma_max: gamma(1) (likewise); above gamma_min.
        learn_endpoints: gamma(0) and gamma(1) are ``ScheduleEndpoint`` parameters.
        rngs: unused (nothing is drawn).

    Call: ``t [B]`` -> ``gamma [B]``.
    """

    learns_interior = False

    def __init__(self, gamma_min: float, gamma_max: float, *, learn_endpoints: bool = False,
                 rngs: nnx.Rngs | None = None):
        self.endpoints = _Endpoints(gamma_min, gamma_max, learned=learn_endpoints)

    def __call__(self, t: jax.Array) -> jax.Array:
        low, high = self.endpoints()
        return low + (high - low) * t


register("fixed_linear")(functools.partial(Linear, learn_endpoints=False))
register("learned_linear")(functools.partial(Linear, learn_endpoints=True))
