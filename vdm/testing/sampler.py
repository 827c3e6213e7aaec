"""The sampler contract's checks: a small run of the sampler on Gaussian data with its Bayes-optimal denoiser.

``check(name, sampler, example)`` runs, for each :class:`vdm.samplers.Example` of the registration (options,
num_steps, whether it is deterministic), the sampler's plan the way ``vdm.samplers.generation`` and the
trainer run it (``sampler.plan(rng, eps_fn, gamma_fn, batch, cond, num_steps=..., **options)``, compiled),
on z_1 of shape ``[BATCH, *SHAPE]`` with ``eps_fn`` the Bayes-optimal eps-prediction of x ~ N(0, SCALE^2 I)
(``vdm.analytic``) and a linear schedule from GAMMA_MIN to GAMMA_MAX, and checks:

- its plan: a :class:`vdm.samplers.Plan` with a Python int ``num_steps``;
- running under jit: the plan compiles and runs inside ``jax.jit``;
- output shape and dtype: z_0 has z_1's shape and dtype;
- finiteness: every value of z_0 is finite;
- nfe: the network evaluations are an integer scalar >= 0;
- determinism for a fixed key: two calls with the same key give the same z_0, bitwise;
- the key used (a stochastic example): two keys give different samples; or, for a deterministic example,
  determinism whatever the key: two keys give the same z_0, bitwise;
- cond reaching eps_fn: ``cond`` switches the denoiser off, which must change z_0;
- chunks: the loop run in uneven chunks (``vdm.samplers.advance``) gives the one-call z_0 and nfe;
- a schedule per element: gamma [B, *SHAPE] with different endpoints per element gives finite z_0 of its shape.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from vdm import analytic, samplers, testing
from vdm.sampler_plan import Example, examples

KIND = "sampler"
BATCH, SHAPE = 3, (4, 2)  # z_1 [3, 4, 2]: a batch of small "images"
SCALE = 0.5  # the data's standard deviation
GAMMA_MIN, GAMMA_MAX = -6.0, 6.0  # the schedule's endpoints
DATA = analytic.GaussianData(dim=math.prod(SHAPE), scale=SCALE)


def eps_fn(z: jax.Array, gamma: jax.Array, cond) -> jax.Array:
    """The Bayes-optimal eps_hat of ``DATA`` for z [B, *SHAPE] (gamma [B] or [B, *SHAPE]), times ``cond["on"]`` [B]."""
    flat = z.reshape(z.shape[0], -1)
    gamma = jnp.asarray(gamma)
    g = gamma if gamma.ndim == 1 else jnp.broadcast_to(gamma, z.shape).reshape(z.shape[0], -1)
    return (cond["on"][:, None] * DATA.eps_fn(flat, g)).reshape(z.shape)


def gamma_fn(t: jax.Array) -> jax.Array:
    """The linear schedule per example: gamma [B] of t [B]."""
    return GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * t


def gamma_per_element(t: jax.Array) -> jax.Array:
    """A linear schedule per element, its endpoints different for each: gamma [B, *SHAPE] of t [B]."""
    spread = jnp.linspace(0.0, 2.0, math.prod(SHAPE)).reshape(SHAPE)
    low, high = GAMMA_MIN + spread, GAMMA_MAX - spread
    return low[None] + (high - low)[None] * jnp.reshape(t, (-1,) + (1,) * len(SHAPE))


def check(name: str, sampler, example: Example | tuple | None) -> None:
    """Run every check of the sampler contract (module docstring) on ``sampler`` for each of its examples.

    Args:
        name: the sampler's name, for messages.
        sampler: what ``vdm.samplers.SAMPLERS`` holds (``vdm.samplers.register`` or ``stepped`` of a plan function).
        example: an :class:`vdm.samplers.Example`, a tuple of them, or None (``Example()``: 8 steps, the
            sampler's default options, stochastic).

    Raises:
        AssertionError: ``sampler '<name>' fails <check>: <what was found>``.
    """
    with testing.checking(KIND, name, "its example"):
        cases = examples(example)
    for case in cases:
        _check_one(f"{name}{dict(case.options) or ''}", sampler, case)


def _check_one(name: str, sampler, case: Example) -> None:
    def plan_of(rng, on, gamma=gamma_fn):
        return sampler.plan(rng, eps_fn, gamma, BATCH, {"on": on}, num_steps=case.num_steps, **case.options)

    keys = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    z_1 = jax.random.normal(jax.random.PRNGKey(7), (BATCH, *SHAPE), jnp.float32)
    on, off = jnp.ones((BATCH,)), jnp.zeros((BATCH,))

    with testing.checking(KIND, name, "its plan"):
        plan = plan_of(keys[0], on)
        assert isinstance(plan, samplers.Plan), f"plan(...) returned {type(plan).__name__}, not a vdm.samplers.Plan"
        assert isinstance(plan.num_steps, int) and plan.num_steps >= 0, \
            f"Plan.num_steps={plan.num_steps!r}: must be a Python int >= 0 (the trainer chunks the loop by it)"

    with testing.checking(KIND, name, "running under jit"):
        sample = jax.jit(lambda rng, z, on: samplers.run(plan_of(rng, on), z))
        z_0, nfe = jax.block_until_ready(sample(keys[0], z_1, on))

    with testing.checking(KIND, name, "output shape and dtype"):
        assert z_0.shape == z_1.shape and z_0.dtype == z_1.dtype, \
            f"z_0 is {z_0.dtype}{list(z_0.shape)} for z_1 {z_1.dtype}{list(z_1.shape)}"

    with testing.checking(KIND, name, "finiteness"):
        assert bool(jnp.all(jnp.isfinite(z_0))), f"{int(jnp.sum(~jnp.isfinite(z_0)))} non-finite values in z_0"

    with testing.checking(KIND, name, "nfe"):
        nfe = jnp.asarray(nfe)
        assert nfe.shape == () and jnp.issubdtype(nfe.dtype, jnp.integer), \
            f"nfe is {nfe.dtype}{list(nfe.shape)}: must be an integer scalar"
        assert int(nfe) >= 0, f"nfe={int(nfe)}"

    with testing.checking(KIND, name, "determinism for a fixed key"):
        again, _ = sample(keys[0], z_1, on)
        np.testing.assert_array_equal(np.asarray(again), np.asarray(z_0), err_msg="two calls with one key differ")

    other, _ = sample(keys[1], z_1, on)
    if case.deterministic:
        with testing.checking(KIND, name, "determinism whatever the key"):
            np.testing.assert_array_equal(np.asarray(other), np.asarray(z_0), err_msg=(
                "declared deterministic (Example(deterministic=True)), but two keys give different z_0"))
    else:
        with testing.checking(KIND, name, "the key used"):
            assert not np.array_equal(np.asarray(other), np.asarray(z_0)), (
                "two keys give the same z_0: the sampler ignores its key (if it is deterministic, register it "
                "with example=Example(deterministic=True))")

    with testing.checking(KIND, name, "cond reaching eps_fn"):
        unguided, _ = sample(keys[0], z_1, off)
        assert not np.array_equal(np.asarray(unguided), np.asarray(z_0)), \
            "eps_fn's output does not depend on cond: cond does not reach it"

    with testing.checking(KIND, name, "chunks"):
        start = jax.jit(lambda rng, z: plan_of(rng, on).init(z))
        advance = jax.jit(lambda rng, carry, lo, hi: samplers.advance(plan_of(rng, on), carry, lo, hi))
        finish = jax.jit(lambda rng, carry: plan_of(rng, on).result(carry))
        carry, done, length = start(keys[0], z_1), 0, 1
        while done < plan.num_steps:
            stop = min(done + length, plan.num_steps)
            carry, done, length = advance(keys[0], carry, done, stop), stop, length + 1
        chunked, chunked_nfe = finish(keys[0], carry)
        np.testing.assert_allclose(np.asarray(chunked), np.asarray(z_0), rtol=1e-6, atol=1e-6,
                                   err_msg="the loop run in chunks differs from one call")
        assert int(chunked_nfe) == int(nfe), f"nfe {int(chunked_nfe)} in chunks, {int(nfe)} in one call"

    with testing.checking(KIND, name, "a schedule per element"):
        z_e, _ = jax.jit(lambda rng, z: samplers.run(plan_of(rng, on, gamma_per_element), z))(keys[0], z_1)
        assert z_e.shape == z_1.shape, f"z_0 is {list(z_e.shape)} for z_1 {list(z_1.shape)}"
        assert bool(jnp.all(jnp.isfinite(z_e))), "non-finite values in z_0"
