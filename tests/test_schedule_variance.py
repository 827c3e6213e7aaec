"""The variance-minimising schedule gradient (VDM, App. I.2) on an analytic problem."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from vdm import analytic, diffusion, objective, schedules, time_sampling

G0, G1 = -10.0, 6.0
DATA = analytic.GaussianData(dim=16, scale=0.5)
BATCH = 256


def _setup():
    sched = schedules.build("monotone_net", gamma_min=G0, gamma_max=G1, hidden=32,
                            learn_endpoints=False, rngs=nnx.Rngs(0))
    graphdef, interior, rest = nnx.split(sched, schedules.ScheduleShape, ...)
    return graphdef, interior, rest


def _losses(graphdef, interior, rest, rng):
    """Per-example L_inf with the plain loss (iid t), for given interior parameters."""
    sched = nnx.merge(graphdef, interior, rest)
    f = DATA.sample(jax.random.fold_in(rng, 0), BATCH)
    return diffusion.diffusion_loss(jax.random.fold_in(rng, 1), f, sched, DATA.eps_fn, time_sampler="iid")


def _variance_grads(graphdef, interior, rest, rng):
    """Interior gradients of mean(L^2) through value_and_grad_with_schedule_variance."""
    f = DATA.sample(jax.random.fold_in(rng, 0), BATCH)
    rng_t, rng_eps = jax.random.split(jax.random.fold_in(rng, 1))
    t = time_sampling.iid(rng_t, BATCH)

    def shape_fn(interior, t):
        return nnx.merge(graphdef, interior, rest).shape(t)

    def per_example(other, s, ds):
        levels = time_sampling.NoiseLevels(G0 + (G1 - G0) * s, (G1 - G0) * ds)
        loss, _ = diffusion.diffusion_terms(rng_eps, f, levels, DATA.eps_fn)
        return loss, loss, {}

    (value, _), _, g_interior = objective.value_and_grad_with_schedule_variance(per_example, shape_fn, interior, rest, t)
    return value, g_interior


def test_helper_equals_direct_gradients_of_mean_L_and_mean_L_squared():
    graphdef, interior, rest = _setup()
    rng = jax.random.PRNGKey(5)
    value, g_var = jax.jit(_variance_grads, static_argnums=0)(graphdef, interior, rest, rng)
    # Second method: differentiate mean(L^2) of the ordinary loss directly (same randomness).
    direct = jax.grad(lambda p: jnp.mean(_losses(graphdef, p, rest, rng) ** 2))(interior)
    np.testing.assert_allclose(value, jnp.mean(_losses(graphdef, interior, rest, rng)), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g_var), jax.tree_util.tree_leaves(direct)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-3 * float(jnp.max(jnp.abs(b))))


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def test_vlb_gradient_on_interior_is_zero_in_expectation_but_variance_gradient_is_not():
    graphdef, interior, rest = _setup()
    keys = jax.random.split(jax.random.PRNGKey(1), 300)
    vlb_grads = jax.jit(jax.vmap(lambda k: _flat(jax.grad(
        lambda p: jnp.mean(_losses(graphdef, p, rest, k)))(interior))))(keys)
    var_grads = jax.jit(jax.vmap(lambda k: _flat(_variance_grads(graphdef, interior, rest, k)[1])))(keys)
    # Project both on the mean variance-gradient direction (fixed before looking at the VLB grads).
    direction = var_grads[:150].mean(0)
    direction = direction / jnp.linalg.norm(direction)
    vlb_proj = np.asarray(vlb_grads[150:] @ direction, np.float64)
    var_proj = np.asarray(var_grads[150:] @ direction, np.float64)
    se = lambda x: x.std(ddof=1) / math.sqrt(len(x))  # noqa: E731
    assert abs(vlb_proj.mean()) < 4 * se(vlb_proj), "VLB gradient on the interior should vanish in expectation"
    assert var_proj.mean() > 8 * se(var_proj), "the variance gradient should be clearly nonzero"
    # The same holds coordinate-wise for the linear slope parameter.
    slope = np.asarray(vlb_grads[:, 0], np.float64)
    assert abs(slope.mean()) < 4 * se(slope)


def test_training_the_interior_on_the_variance_gradient_reduces_the_variance(capsys):
    graphdef, interior, rest = _setup()
    opt = optax.adam(3e-2)
    opt_state = opt.init(interior)

    @jax.jit
    def step(interior, opt_state, rng):
        _, grads = _variance_grads(graphdef, interior, rest, rng)
        updates, opt_state = opt.update(grads, opt_state, interior)
        return optax.apply_updates(interior, updates), opt_state

    def evaluate(interior):
        keys = jax.random.split(jax.random.PRNGKey(1234), 64)
        return np.asarray(jax.jit(jax.vmap(lambda k: _losses(graphdef, interior, rest, k)))(keys), np.float64).ravel()

    before = evaluate(interior)
    for i in range(300):
        interior, opt_state = step(interior, opt_state, jax.random.PRNGKey(100 + i))
    after = evaluate(interior)
    truth = DATA.continuous_loss(G0, G1)
    for losses in (before, after):  # the bound itself does not move
        assert abs(losses.mean() - truth) < 4 * losses.std() / math.sqrt(losses.size)
    with capsys.disabled():
        print(f"\n[schedule variance] per-example variance of L_inf: linear-ish init {before.var():.2f}"
              f" -> after 300 variance-gradient steps {after.var():.2f}")
    assert after.var() < 0.7 * before.var()
    sched = nnx.merge(graphdef, interior, rest)
    np.testing.assert_allclose(sched(jnp.array([0.0, 1.0])), [G0, G1], atol=1e-4)
