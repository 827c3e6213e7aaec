"""Schedules: closed forms of the analytic ones, learning, registration and its static contract, and the contract
checks (``vdm.testing.schedule``, run on every registered schedule by ``tests/test_contracts.py``) failing on
deliberately broken schedules."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdm import configlib, diffusion, registry, schedules, testing
from vdm.configs import get as get_config

G0, G1 = -13.3, 5.0
T = jnp.linspace(0.0, 1.0, 1001)
DATA_SHAPE = (2, 3)  # for the schedules that are per element


def _build(name, gamma_min=G0, gamma_max=G1, **kwargs):
    return schedules.build(name, gamma_min=gamma_min, gamma_max=gamma_max, rngs=nnx.Rngs(0), data_shape=DATA_SHAPE,
                           **kwargs)


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
    with pytest.raises(ValueError, match="^schedule 'per_pixel_polynomial' is per element: it needs data_shape$"):
        schedules.build("per_pixel_polynomial", gamma_min=G0, gamma_max=G1)
    with pytest.raises(ValueError, match="^latent_size=0: schedule 'latent_polynomial' is conditioned"):
        schedules.build("latent_polynomial", gamma_min=G0, gamma_max=G1, data_shape=DATA_SHAPE)


def test_a_plain_function_declares_the_endpoints_it_takes_at_0_and_1():
    assert [float(v) for v in diffusion.schedule_endpoints(diffusion.FunctionSchedule(lambda t: 3.0 * t - 1.0))] == [
        -1.0, 2.0]


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


def test_a_conditioned_schedule_is_bound_to_its_latent_and_others_pass_through():
    sched = _build("latent_polynomial", latent_size=4, hidden=8)
    latent = jnp.ones((5, 4))
    bound = schedules.bind(sched, latent)
    assert isinstance(bound, schedules.BoundToLatent)
    for a, b in zip(bound.endpoints(), sched.endpoints()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(bound(T[:5]), sched(T[:5], latent))
    with pytest.raises(ValueError, match="conditioned on a latent"):
        schedules.bind(sched, None)
    linear, plain = _build("fixed_linear"), diffusion.FunctionSchedule(lambda t: t)
    assert schedules.bind(linear, latent) is linear and schedules.bind(plain, None) is plain


def test_the_shipped_schedules_are_registered_in_the_table_order_and_declare_the_contract():
    assert list(schedules.SCHEDULES) == ["fixed_linear", "learned_linear", "monotone_net", "cosine", "shifted_cosine",
                                         "optimal_transport", "per_pixel_polynomial", "latent_polynomial"]
    assert schedules.SCHEDULES.entry("cosine").module == "vdm.schedules.cosine"
    assert schedules.SCHEDULES.entry("fixed_linear").module == "vdm.schedules.linear"  # a partial, read through
    for name in schedules.SCHEDULES:
        sched = _build(name, latent_size=4)
        assert isinstance(sched, schedules.Schedule), name
        assert (sched.elementwise, sched.conditioned) == {"per_pixel_polynomial": (True, False),
                                                          "latent_polynomial": (True, True)}.get(name, (False, False))
    assert _build("learned_linear").learns_endpoints and not _build("fixed_linear").learns_endpoints


# --------------------------------------------------------------------------------------
# Deliberately broken schedules: the static contract refuses their registration, the checks fail them
# --------------------------------------------------------------------------------------


class _Curve(schedules.Schedule):
    """A fixed schedule gamma = g0 + (g1 - g0) (t + bend sin(2 pi t)), declaring (g0, g1 + lie)."""

    learns_endpoints = False
    bend, lie = 0.0, 0.0

    def __init__(self, gamma_min, gamma_max, *, rngs=None):
        self.low, self.high = float(gamma_min), float(gamma_max)

    def endpoints(self):
        return jnp.float32(self.low), jnp.float32(self.high + self.lie)

    def __call__(self, t):
        return self.low + (self.high - self.low) * (t + self.bend * jnp.sin(2 * jnp.pi * t))


class _Falls(_Curve):
    bend = 0.3  # gamma'(t) = (g1 - g0) (1 + 0.6 pi cos(2 pi t)) < 0 around t = 1/2


class _Lies(_Curve):
    lie = 1.0


def test_a_sound_schedule_outside_the_table_passes_the_checks():
    testing.check("schedule", _Curve, name="curve")


def test_a_schedule_whose_gamma_falls_fails_monotonicity():
    with pytest.raises(AssertionError, match=r"^schedule 'falls' fails monotonicity: gamma does not increase"):
        testing.check("schedule", _Falls, name="falls")


def test_a_schedule_whose_endpoints_lie_fails_declared_endpoints():
    with pytest.raises(AssertionError, match="^schedule 'lies' fails declared endpoints: "):
        testing.check("schedule", _Lies, name="lies")


def test_a_schedule_declaring_what_it_does_not_learn_fails_declarations():
    class Claims(_Curve):
        learns_interior = True

    with pytest.raises(AssertionError, match="^schedule 'claims' fails declarations: learns_interior=True but it "
                                             "holds 0 ScheduleShape parameters"):
        testing.check("schedule", Claims, name="claims")


def test_the_static_contract_refuses_a_broken_registration_and_adds_nothing():
    before = dict(schedules.SCHEDULES)

    class NotASchedule(nnx.Module):
        def __call__(self, t):
            return t

    class NoEndpoints(schedules.Schedule):
        learns_endpoints = False

        def __call__(self, t):
            return t

    class NoDataShape(_Curve):
        elementwise = True

    class NoLatentSize(_Curve):
        conditioned = True

    class NoRange(_Curve):
        def __init__(self, *, rngs=None):
            pass

    cases = {NotASchedule: "is not a subclass of vdm.schedules.Schedule",
             functools.partial(NotASchedule): "is not a subclass of vdm.schedules.Schedule",
             NoEndpoints: "NoEndpoints does not implement endpoints",
             NoDataShape: r"NoDataShape's constructor must take \(gamma_min, gamma_max, \*, rngs, data_shape, \*\*kwargs",
             NoLatentSize: "NoLatentSize's constructor must take .*latent_size",
             NoRange: "NoRange's constructor must take"}
    for piece, problem in cases.items():
        with pytest.raises(registry.RegistrationError, match=f"^schedule 'broken' does not meet the schedule "
                                                             f"contract: .*{problem}"):
            schedules.register("broken")(piece)
        with pytest.raises(AssertionError, match="^schedule 'broken' fails the static contract: "):
            testing.check("schedule", piece, name="broken")
    with pytest.raises(registry.RegistrationError, match=r"^schedule 'cosine' is already registered \(by "
                                                         r"vdm.schedules.cosine\)"):
        schedules.register("cosine")(_Curve)
    assert dict(schedules.SCHEDULES) == before


# --------------------------------------------------------------------------------------
# What the objective says about a schedule
# --------------------------------------------------------------------------------------


def test_importance_sampling_with_mulan_suggests_what_works():
    """MuLAN's schedule is per element: importance sampling (one log-SNR per example) cannot train it, with fixed
    endpoints or not, so the refusal suggests uniform t -- and that change validates."""
    config, _ = configlib.override(get_config("mnist_mulan"), {"loss.importance_sampling": "weighting"})
    with pytest.raises(configlib.ConfigError, match=r"^config.loss.importance_sampling='weighting': draws one log-SNR "
                                                    r"per example; the schedule gives one per element.*"
                                                    r"loss.importance_sampling=''\)$"):
        configlib.validate(config)
    config.model.schedule_kwargs.learn_endpoints = False  # what the message used to suggest: refused all the same
    with pytest.raises(configlib.ConfigError, match="the schedule gives one per element"):
        configlib.validate(config)
    config.loss.importance_sampling = ""
    configlib.validate(config)
