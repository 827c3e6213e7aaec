"""``monotone_net``: VDM's learned monotone schedule (App. H), its endpoints pinned."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vdm.schedules import register
from vdm.schedules.base import ScheduleShape, _Endpoints, _inverse_softplus, _WithEndpoints


@register("monotone_net", example={"kwargs": {"hidden": 8}})
class MonotoneNet(_WithEndpoints):
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

    Args:
        gamma_min: gamma(0) (its initial value if learned).
        gamma_max: gamma(1) (likewise); above gamma_min.
        hidden: H, the hidden units of l2 and l3.
        learn_endpoints: gamma(0) and gamma(1) are ``ScheduleEndpoint`` parameters.
        rngs: draws the initial weights of l2 and l3.

    Call: ``t [B]`` -> ``gamma [B]``.
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

    def _h(self, t: jax.Array) -> jax.Array:
        linear = jax.nn.softplus(self.slope[...]) * t
        hidden = jax.nn.softplus(self.w2[...]) * (2.0 * t[..., None] - 1.0) + self.b2[...]
        hidden = 2.0 * (jax.nn.sigmoid(hidden) - 0.5)
        return linear + hidden @ jax.nn.softplus(self.w3[...]) / self.hidden

    def shape(self, t: jax.Array) -> jax.Array:
        """The normalised interior [B] of t [B]: increasing, shape(0) = 0, shape(1) = 1."""
        h0, h1 = self._h(jnp.array([0.0, 1.0]))
        return (self._h(t) - h0) / (h1 - h0)

    def __call__(self, t: jax.Array) -> jax.Array:
        low, high = self.endpoints()
        return low + (high - low) * self.shape(t)
