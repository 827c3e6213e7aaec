"""Contract tests over every schedule, plus closed forms for the analytic ones."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdm import schedules

G0, G1 = -13.3, 5.0
T = jnp.linspace(0.0, 1.0, 1001)


DATA_SHAPE = (2, 3)  # for the schedules that are per element


LATENT_SIZE = 3  # for the schedules conditioned on a latent


class _OneLatent(nnx.Module):
    """A schedule conditioned on a latent (``conditioned``) as a schedule of t alone, for the contract: one random
    latent, with coefficients far from the initial line, for every t. It declares what the schedule declares."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.latent = nnx.Variable(3.0 * jax.random.normal(jax.random.PRNGKey(1), (1, LATENT_SIZE)))
        for w in (schedule.w2, schedule.b2):  # away from the initial straight line
            w[...] = w[...] + 0.5 * jax.random.normal(jax.random.PRNGKey(2), w.shape)
        self.elementwise, self.learns_interior = schedule.elementwise, schedule.learns_interior
        self.learns_endpoints = schedule.learns_endpoints

    def _latents(self, t):
        return jnp.broadcast_to(self.latent[...], (jnp.shape(t)[0], LATENT_SIZE))

    def __call__(self, t):
        return self.schedule(t, self._latents(t))

    def shape(self, t):
        return self.schedule.shape(t, self._latents(t))

    def endpoints(self):
        return self.schedule.endpoints()


def _build(name, gamma_min=G0, gamma_max=G1):
    sched = schedules.build(name, gamma_min=gamma_min, gamma_max=gamma_max, rngs=nnx.Rngs(0), data_shape=DATA_SHAPE,
                            latent_size=LATENT_SIZE)
    return _OneLatent(sched) if getattr(sched, "conditioned", False) else sched


def _columns(gamma):
    """gamma [T] or per element [T, *DATA_SHAPE] as [T, curves]: one column per element's curve."""
    gamma = np.asarray(gamma)
    return gamma.reshape(gamma.shape[0], -1)


@pytest.mark.parametrize("name", list(schedules.SCHEDULES))
@pytest.mark.parametrize("endpoints", [(G0, G1), (-20.0, 20.0), (-2.0, 2.0)])
def test_increasing_with_exact_endpoints_under_jit(name, endpoints):
    sched = _build(name, *endpoints)
    gamma, slope = jax.jit(lambda s, t: jax.jvp(s, (t,), (jnp.ones_like(t),)))(sched, T)
    expected_shape = T.shape + (DATA_SHAPE if getattr(sched, "elementwise", False) else ())
    assert gamma.shape == slope.shape == expected_shape
    gamma, slope = _columns(gamma), _columns(slope)
    assert np.all(np.isfinite(gamma)) and np.all(np.isfinite(slope))
    np.testing.assert_allclose(gamma[[0, -1]], np.broadcast_to(np.array(endpoints)[:, None], (2, gamma.shape[1])),
                               atol=2e-4 * max(1, abs(endpoints[0])))
    assert np.all(np.diff(gamma, axis=0) > 0), "gamma must be strictly increasing"
    assert np.all(slope > 0), "gamma'(t) must be positive"
    # jvp agrees with a finite difference of the same function (away from the ends).
    fd = (gamma[2:] - gamma[:-2]) / (2 * float(T[1]))
    np.testing.assert_allclose(slope[100:-100], fd[99:-99], rtol=2e-2, atol=2e-2)
    # Same values without jit.
    np.testing.assert_allclose(_columns(sched(T)), gamma, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(schedules.SCHEDULES))
def test_parameter_gradients_are_finite(name):
    sched = _build(name)
    params = jax.tree_util.tree_leaves(nnx.state(sched, nnx.Param))
    learned = sched.learns_endpoints or sched.learns_interior  # what it declares it learns
    assert bool(params) == learned, f"{name}: learned parameters {params} (expected: {learned})"
    if not learned:
        return
    grads = nnx.grad(lambda s: jnp.sum(jnp.sin(s(T))))(sched)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert any(np.any(np.asarray(g) != 0) for g in leaves)


def test_cosine_matches_its_closed_form_and_shift_moves_it():
    t = np.linspace(0.0, 1.0, 11)
    b, e = math.atan(math.exp(G0 / 2)), math.atan(math.exp(G1 / 2))
    expected = 2 * np.log(np.tan(b + (e - b) * t))
    np.testing.assert_allclose(_build("cosine")(jnp.asarray(t)), expected, rtol=1e-4, atol=1e-4)
    # Unpinned limit: with wide endpoints the middle is the textbook cosine lambda = -2 log tan(pi t / 2).
    wide = schedules.build("cosine", gamma_min=-30.0, gamma_max=30.0)
    mid = np.linspace(0.2, 0.8, 7)
    np.testing.assert_allclose(wide(jnp.asarray(mid)), 2 * np.log(np.tan(np.pi * mid / 2)), atol=1e-3)
    shifted = schedules.build("shifted_cosine", gamma_min=-30.0, gamma_max=30.0, shift=2 * math.log(32 / 64))
    np.testing.assert_allclose(shifted(jnp.asarray(mid)) - wide(jnp.asarray(mid)), 2 * math.log(0.5), atol=1e-3)


def test_cosine_is_accurate_near_gamma_20():
    sched = schedules.build("cosine", gamma_min=-20.0, gamma_max=20.0)
    t = np.array([0.999, 0.9999])
    b, e = math.atan(math.exp(-10)), math.atan(math.exp(10))
    # float64 reference through the complementary angle
    expected = -2 * np.log(np.tan((math.pi / 2 - b) - (e - b) * t))
    np.testing.assert_allclose(sched(jnp.asarray(t, jnp.float32)), expected, rtol=1e-3)


def test_monotone_net_endpoints_stay_pinned_while_learning():
    sched = schedules.build("monotone_net", gamma_min=G0, gamma_max=G1, hidden=16,
                            learn_endpoints=False, rngs=nnx.Rngs(1))
    opt = nnx.Optimizer(sched, __import__("optax").adam(0.1), wrt=nnx.Param)
    target = G0 + (G1 - G0) * T**3  # pull the interior far from linear

    @nnx.jit
    def step(sched, opt):
        loss, grads = nnx.value_and_grad(lambda s: jnp.mean((s(T) - target) ** 2))(sched)
        opt.update(sched, grads)
        return loss

    first = float(step(sched, opt))
    for _ in range(100):
        last = float(step(sched, opt))
    assert last < 0.2 * first
    np.testing.assert_allclose(sched(jnp.array([0.0, 1.0])), [G0, G1], atol=1e-4)
    assert np.all(np.diff(np.asarray(sched(T))) > 0)


def test_learned_endpoints_move_but_keep_order():
    sched = schedules.build("learned_linear", gamma_min=-2.0, gamma_max=2.0)
    opt = nnx.Optimizer(sched, __import__("optax").sgd(0.5), wrt=nnx.Param)
    for _ in range(50):  # push gamma_max below gamma_min's starting value
        grads = nnx.grad(lambda s: (s(jnp.ones(1))[0] + 5.0) ** 2)(sched)
        opt.update(sched, grads)
    g0, g1 = (float(v) for v in sched(jnp.array([0.0, 1.0])))
    assert g1 > g0 and g1 < 2.0


def test_bad_schedule_arguments_give_one_line_errors():
    with pytest.raises(ValueError, match="valid names: fixed_linear"):
        schedules.build("quadratic", gamma_min=G0, gamma_max=G1)
    with pytest.raises(ValueError, match="^gamma_min=5.0: must be below gamma_max=5.0$"):
        schedules.build("cosine", gamma_min=5.0, gamma_max=5.0)
    with pytest.raises(ValueError, match="monotone_net"):
        schedules.build("monotone_net", gamma_min=G0, gamma_max=G1, width=3)


@pytest.mark.parametrize("name", list(schedules.SCHEDULES))
def test_declared_endpoints_match_the_curve_and_leave_the_interior_without_gradient(name):
    from vdm import diffusion

    sched = _build(name)
    g0, g1 = diffusion.schedule_endpoints(sched)
    curve = np.asarray(sched(jnp.array([0.0, 1.0])))
    np.testing.assert_allclose(np.concatenate([g0, g1]) if curve.ndim > 1 else [g0, g1], curve, atol=2e-4)
    np.testing.assert_allclose(np.ravel(g0), G0, atol=1e-5)
    np.testing.assert_allclose(np.ravel(g1), G1, atol=1e-5)
    grads = nnx.grad(lambda s: sum(jnp.sum(g) for g in diffusion.schedule_endpoints(s)))(sched)
    for path, g in jax.tree_util.tree_flatten_with_path(nnx.state(grads, schedules.ScheduleShape))[0]:
        assert np.all(np.asarray(g) == 0), path
    # A plain function has no declared endpoints: it is evaluated at t = 0 and 1.
    assert [float(v) for v in diffusion.schedule_endpoints(lambda t: 3.0 * t - 1.0)] == [-1.0, 2.0]


@pytest.mark.parametrize("name", list(schedules.SCHEDULES))
def test_declarations_match_the_parameters(name):
    """learns_endpoints / learns_interior say what the schedule's parameters are; an interior has a shape(t)."""
    sched = _build(name)
    endpoints = jax.tree_util.tree_leaves(nnx.state(sched, schedules.ScheduleEndpoint))
    interior = jax.tree_util.tree_leaves(nnx.state(sched, schedules.ScheduleShape))
    assert sched.learns_endpoints == bool(endpoints)
    assert sched.learns_interior == bool(interior)
    if sched.learns_interior:
        ends = _columns(sched.shape(jnp.array([0.0, 1.0])))
        np.testing.assert_allclose(ends, np.broadcast_to([[0.0], [1.0]], ends.shape), atol=1e-6)


def test_per_pixel_polynomial_is_its_closed_form_per_element_whatever_its_parameters():
    """Random coefficients and endpoints per element: each element's curve is the polynomial of the docstring
    (float64 NumPy), pinned to its own endpoints, increasing, with gamma'(t) from jax.jvp equal to
    (g1 - g0) ((a t^2 + b t + c)^2 + d) / (P(1) + d)."""
    sched = _build("per_pixel_polynomial")
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=DATA_SHAPE) * 3 for _ in range(3))
    low, width = rng.uniform(-12, -2, DATA_SHAPE), rng.normal(size=DATA_SHAPE) * 3
    for name, value in (("a", a), ("b", b), ("c", c)):
        getattr(sched, name)[...] = jnp.asarray(value, jnp.float32)
    sched.endpoints.low[...], sched.endpoints.width[...] = jnp.asarray(low, jnp.float32), jnp.asarray(width, jnp.float32)
    high = low + np.log1p(np.exp(width))
    t = np.linspace(0.0, 1.0, 201)[:, None, None]
    d = schedules.QUINTIC_SLACK

    def p(t):
        return a**2 * t**5 / 5 + a * b * t**4 / 2 + (b**2 + 2 * a * c) * t**3 / 3 + b * c * t**2 + c**2 * t + d * t

    expected = low + (high - low) * p(t) / p(1.0)
    expected_slope = (high - low) * ((a * t**2 + b * t + c) ** 2 + d) / p(1.0)
    gamma, slope = jax.jvp(sched, (jnp.asarray(t[:, 0, 0], jnp.float32),), (jnp.ones(201),))
    np.testing.assert_allclose(np.asarray(gamma), expected, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(slope), expected_slope, rtol=1e-3, atol=1e-3 * np.abs(expected_slope).max())
    assert np.all(np.diff(np.asarray(gamma), axis=0) > 0)
    g0, g1 = sched.endpoints()
    assert g0.shape == g1.shape == (1,) + DATA_SHAPE
    np.testing.assert_allclose(np.asarray(g0[0]), low, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g1[0]), high, rtol=1e-5)
