"""The samplers against the known answers for Gaussian data, and the sampler contract's own tests.

For x ~ N(0, s^2 I) and the Bayes-optimal denoiser the marginal of z_gamma is N(0, v(gamma) I)
with v = alpha^2 s^2 + sigma^2, and the probability-flow ODE is linear: it maps z_1 to
z_0 = z_1 sqrt(v(gamma_0) / v(gamma_1)) exactly. Every registered sampler, with the options of each of its
registered examples, is checked against the marginal; the deterministic ones also against that map (and their
order of convergence). What every sampler must do (shapes, its key, chunks, cond) is ``vdm.testing.sampler``,
run on each registered sampler by ``tests/test_contracts.py``; here, deliberately broken samplers fail it.
"""
import inspect

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import analytic, diffusion, options, registry, samplers, schedules, testing
from vdm.testing import sampler as sampler_checks

DATA = analytic.GaussianData(dim=2, scale=0.5)
G0, G1 = -8.0, 8.0


def v(g):
    """Variance of the marginal of z_gamma for DATA (float64)."""
    return 1 / (1 + np.exp(g)) * DATA.scale**2 + 1 / (1 + np.exp(-g))


def _flow_map_error(name, num_steps, z1, schedule="fixed_linear", **kwargs):
    sched = schedules.build(schedule, gamma_min=G0, gamma_max=G1)
    run = jax.jit(lambda z: samplers.build(name)(jax.random.PRNGKey(1), DATA.eps_fn, sched, z, num_steps=num_steps,
                                                 **kwargs))
    z0, nfe = run(z1)
    exact = np.asarray(z1, np.float64) * np.sqrt(v(G0) / v(G1))
    return float(np.abs(np.asarray(z0, np.float64) - exact).max()), int(nfe)


# Every registered sampler with the options of each of its registered examples.
SAMPLER_CASES = [(name, dict(example.options)) for name in samplers.SAMPLERS
                 for example in sampler_checks.examples(samplers.SAMPLERS.entry(name).example)]


@pytest.mark.parametrize("name,kwargs", SAMPLER_CASES, ids=[f"{n}{k}" for n, k in SAMPLER_CASES])
@pytest.mark.parametrize("schedule", ["fixed_linear", "cosine"])
def test_sampler_with_bayes_denoiser_recovers_the_data_distribution(name, kwargs, schedule):
    # With the exact denoiser, p(z_s | z_t) is the true reverse process, so z_0 ~ N(0, v(gamma_0) I).
    sched = schedules.build(schedule, gamma_min=G0, gamma_max=G1)
    n = 20000
    # z_1 from the true marginal q(z_1) (not N(0, I)), so that only the sampler is tested.
    z1 = jnp.sqrt(v(G1)) * jax.random.normal(jax.random.PRNGKey(0), (n, 2))
    run = samplers.build(name)
    z0, nfe = jax.jit(lambda r, z: run(r, DATA.eps_fn, sched, z, num_steps=200, **kwargs))(jax.random.PRNGKey(1), z1)
    var = np.asarray(z0, np.float64).var(0)
    # Sample variance of n normals has relative standard error sqrt(2 / n) = 1%.
    np.testing.assert_allclose(var, v(G0), rtol=0.05)
    assert abs(float(np.mean(z0))) < 4 * np.sqrt(v(G0) / (2 * n))
    assert int(nfe) == 200 or name not in ("ancestral", "ddim", "dpm_solver_2m")  # the fixed-step ones: one call a step


def test_ddim_with_eta_1_is_the_ancestral_sampler():
    """Same grid, same noise: the two updates are one formula written two ways."""
    sched = schedules.build("cosine", gamma_min=G0, gamma_max=G1)
    z1 = jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    z_a, _ = samplers.ancestral(jax.random.PRNGKey(3), DATA.eps_fn, sched, z1, num_steps=50)
    z_d, _ = samplers.ddim(jax.random.PRNGKey(3), DATA.eps_fn, sched, z1, num_steps=50, eta=1.0)
    np.testing.assert_allclose(np.asarray(z_d), np.asarray(z_a), atol=1e-5)


@pytest.mark.parametrize("name,order,steps", [("ddim", 1.0, (40, 80)), ("dpm_solver_2m", 2.0, (40, 80))])
def test_deterministic_samplers_follow_the_flow_with_their_order_of_convergence(name, order, steps):
    z1 = jnp.sqrt(v(G1)) * jax.random.normal(jax.random.PRNGKey(0), (256, 2))
    (coarse, _), (fine, _) = (_flow_map_error(name, n, z1, schedule="cosine") for n in steps)
    measured = np.log2(coarse / fine)
    assert abs(measured - order) < 0.35, (coarse, fine, measured)
    assert fine < 0.03


def test_the_adaptive_ode_sampler_meets_its_tolerance_and_counts_its_network_calls():
    calls = []

    def counted(z, g, cond=None):
        jax.debug.callback(lambda: calls.append(1))
        return DATA.eps_fn(z, g)

    sched = schedules.build("cosine", gamma_min=G0, gamma_max=G1)
    z1 = jnp.sqrt(v(G1)) * jax.random.normal(jax.random.PRNGKey(0), (64, 2))
    errors, nfes = [], []
    for tol in (1e-3, 1e-5):
        calls.clear()
        z0, nfe = jax.jit(lambda z: samplers.ode(None, counted, sched, z, rtol=tol, atol=tol))(z1)
        jax.effects_barrier()
        assert int(nfe) == len(calls)  # the reported count is the real one
        errors.append(float(np.abs(np.asarray(z0) - np.asarray(z1) * np.sqrt(v(G0) / v(G1))).max()))
        nfes.append(int(nfe))
    assert errors[1] < 1e-3 and errors[1] < errors[0] and nfes[1] > nfes[0]


def test_ddim_with_eta_0_is_invertible():
    x = DATA.sample(jax.random.PRNGKey(5), 64)
    sched = schedules.build("cosine", gamma_min=G0, gamma_max=G1)
    errors = []
    for n in (100, 400):
        z1 = samplers.ddim_invert(DATA.eps_fn, sched, x, num_steps=n)
        back, _ = samplers.ddim(None, DATA.eps_fn, sched, z1, num_steps=n)
        errors.append(float(np.abs(np.asarray(back) - np.asarray(x)).max()))
    assert errors[1] < 0.02 and errors[1] < errors[0] / 3  # first order both ways: ~4x smaller at 4x the steps
    z1 = samplers.ddim_invert(DATA.eps_fn, sched, x, num_steps=400)  # and it lands on the prior's scale
    np.testing.assert_allclose(np.asarray(z1).std(), np.sqrt(v(G1)), rtol=0.2)


def test_decode_samples_picks_the_nearest_bin_at_low_noise():
    x = jax.random.randint(jax.random.PRNGKey(0), (8, 4, 4, 1), 0, 256)
    f = diffusion.encode(x)
    z0 = diffusion.diffuse(f, jnp.full((8,), -13.3), jax.random.normal(jax.random.PRNGKey(1), f.shape))
    decoded = samplers.decode_samples(jax.random.PRNGKey(2), z0, jnp.full((8,), -13.3), 256)
    assert float(jnp.mean(decoded == x)) > 0.95


def test_generate_shapes_and_range_and_unknown_sampler():
    sched = schedules.build("fixed_linear", gamma_min=-13.3, gamma_max=5.0)
    x, nfe = samplers.generate(jax.random.PRNGKey(0), lambda z, g, c: jnp.zeros_like(z), sched, (3, 5, 5, 1),
                               num_steps=4, vocab_size=17)
    assert x.shape == (3, 5, 5, 1) and x.dtype == jnp.int32 and int(nfe) == 4
    assert int(x.min()) >= 0 and int(x.max()) <= 16
    with pytest.raises(ValueError, match="valid names: ancestral, ddim, dpm_solver_2m, ode"):
        samplers.build("euler")
    with pytest.raises(options.OptionError, match="^spacing='cubic': valid names: time, logsnr$"):
        samplers.ddim(None, DATA.eps_fn, sched, jnp.zeros((2, 2)), num_steps=2, spacing="cubic")


def test_every_option_of_every_sampler_has_its_check_and_the_registries_hold_the_pieces():
    for name, sampler in samplers.SAMPLERS.items():
        params = inspect.signature(sampler).parameters.values()
        taken = {p.name for p in params if p.kind == p.KEYWORD_ONLY} - {"num_steps"}
        assert taken <= set(samplers.OPTIONS), name
    assert all(issubclass(getattr(diffrax, cls), diffrax.AbstractSolver) for cls in samplers.SOLVERS.values())
    assert list(samplers.SPACINGS) == ["time", "logsnr"]
    sched = schedules.build("fixed_linear", gamma_min=G0, gamma_max=G1)
    # "logsnr" spaces gamma evenly; for the linear schedule "time" does too.
    np.testing.assert_allclose(samplers.gamma_grid(sched, 1, 4, "logsnr")[:, 0], np.linspace(G1, G0, 5), atol=1e-5)
    np.testing.assert_allclose(samplers.gamma_grid(sched, 1, 4, "time")[:, 0], np.linspace(G1, G0, 5), atol=1e-5)
    with pytest.raises(ValueError, match="^unknown spacing 'cubic'; valid names: time, logsnr$"):
        samplers.gamma_grid(sched, 1, 4, "cubic")
    with pytest.raises(ValueError, match="^unknown ODE solver 'rk4'; valid names: tsit5, dopri5$"):
        samplers.solve_ode(lambda g, y: y, jnp.zeros(2), 0.0, 1.0, rtol=1e-3, atol=1e-3, solver="rk4")


@pytest.mark.parametrize("kwargs,message", [
    ({"eta": 1.5}, "eta=1.5: must be in [0, 1] (0: deterministic, 1: ancestral)"),
    ({"eta": "nan"}, "eta='nan': must be in [0, 1] (0: deterministic, 1: ancestral)"),
    ({"eta": float("nan")}, "eta=nan: must be in [0, 1] (0: deterministic, 1: ancestral)"),
    ({"spacing": 1}, "spacing=1: valid names: time, logsnr"),
    ({"solver": "rk4"}, "solver='rk4': valid names: tsit5, dopri5"),
    ({"rtol": 0.0}, "rtol=0.0: must be a finite number > 0"),
    ({"atol": float("inf")}, "atol=inf: must be a finite number > 0"),
    ({"atol": "1e-3"}, "atol='1e-3': must be a finite number > 0"),
    ({"segments": 1.5}, "segments=1.5: must be an integer >= 1"),
    ({"segments": True}, "segments=True: must be an integer >= 1"),
    ({"max_steps": 0}, "max_steps=0: must be an integer >= 1"),
])
def test_bad_sampler_options_are_one_line_naming_the_option(kwargs, message):
    with pytest.raises(options.OptionError) as info:
        samplers.check_options(kwargs)
    assert str(info.value) == message
    samplers.check_options({"eta": 1, "spacing": "logsnr", "rtol": 1e-3, "atol": np.float32(1e-3), "segments": 2})


def test_ode_in_segments_still_solves_the_flow():
    """Segments restart the step size at each boundary: same map within tolerance, a few more calls."""
    z1 = jax.random.normal(jax.random.PRNGKey(0), (16, 2)) * np.sqrt(v(G1))
    err_one, nfe_one = _flow_map_error("ode", 0, z1, rtol=1e-5, atol=1e-5)
    err_four, nfe_four = _flow_map_error("ode", 0, z1, rtol=1e-5, atol=1e-5, segments=4)
    assert err_one < 1e-3 and err_four < 1e-3
    assert nfe_one < nfe_four < 2 * nfe_one + 40
    with pytest.raises(options.OptionError, match="^segments=0: must be an integer >= 1$"):
        samplers.ode(None, DATA.eps_fn, schedules.build("cosine", gamma_min=G0, gamma_max=G1), z1, segments=0)


@pytest.mark.parametrize("sampler,kwargs,tol", [("ode", {"rtol": 1e-6, "atol": 1e-6}, 2e-5),
                                                ("dpm_solver_2m", {"num_steps": 64}, 2e-3),
                                                ("ddim", {"num_steps": 256}, 2e-2)])
def test_deterministic_samplers_follow_the_closed_form_flow_with_a_schedule_per_element(sampler, kwargs, tol):
    """Gaussian data, Bayes-optimal denoiser, endpoints and interiors different per element: the probability-flow
    ODE maps z_1 to z_0 = z_1 sqrt(v_0,i / v_1,i) element by element (v = alpha^2 s^2 + sigma^2)."""
    from test_diffusion import per_element_schedule

    data = analytic.GaussianData(dim=4, scale=0.5)
    sched = per_element_schedule(4, seed=3)
    g0, g1 = (np.asarray(g, np.float64)[0] for g in sched.endpoints())

    def v(g):
        return data.scale**2 / (1 + np.exp(g)) + 1 / (1 + np.exp(-g))

    z_1 = jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    kwargs = {"num_steps": 0} | kwargs
    z_0, _ = jax.jit(lambda z: samplers.build(sampler)(jax.random.PRNGKey(1), data.eps_fn, sched, z, **kwargs))(z_1)
    expected = np.asarray(z_1, np.float64) * np.sqrt(v(g0) / v(g1))
    np.testing.assert_allclose(np.asarray(z_0, np.float64), expected, atol=tol * np.abs(expected).max())


def _keyless(rng, eps_fn, gamma_fn, batch, cond=None, *, num_steps: int) -> samplers.Plan:
    """Broken: the ancestral sampler with its own fixed key in place of ``rng``."""
    return samplers.ancestral.plan(jax.random.PRNGKey(0), eps_fn, gamma_fn, batch, cond, num_steps=num_steps)


def _wrong_shape(rng, eps_fn, gamma_fn, batch, cond=None, *, num_steps: int) -> samplers.Plan:
    """Broken: z_0 loses all but the first element of each row."""
    plan = samplers.ancestral.plan(rng, eps_fn, gamma_fn, batch, cond, num_steps=num_steps)
    return plan._replace(result=lambda carry: (plan.result(carry)[0][:, :1], plan.result(carry)[1]))


def _float_nfe(rng, eps_fn, gamma_fn, batch, cond=None, *, num_steps: int) -> samplers.Plan:
    """Broken: the network evaluations as a float."""
    plan = samplers.ancestral.plan(rng, eps_fn, gamma_fn, batch, cond, num_steps=num_steps)
    return plan._replace(result=lambda carry: (plan.result(carry)[0], jnp.float32(num_steps)))


def _uncond(rng, eps_fn, gamma_fn, batch, cond=None, *, num_steps: int) -> samplers.Plan:
    """Broken: cond never reaches eps_fn."""
    return samplers.ancestral.plan(rng, eps_fn, gamma_fn, batch, {"on": jnp.ones((batch,))}, num_steps=num_steps)


@pytest.mark.parametrize("plan_fn,example,message", [
    (_keyless, None, "the key used: two keys give the same z_0"),
    (_wrong_shape, None, r"output shape and dtype: z_0 is float32\[3, 1, 2\] for z_1 float32\[3, 4, 2\]"),
    (_float_nfe, None, "nfe: nfe is float32"),
    (_uncond, None, "cond reaching eps_fn"),
    (samplers.ancestral.plan, samplers.Example(deterministic=True), "determinism whatever the key"),
], ids=["ignores-key", "wrong-shape", "float-nfe", "ignores-cond", "falsely-deterministic"])
def test_a_broken_sampler_fails_the_check_that_names_its_fault(plan_fn, example, message):
    with pytest.raises(AssertionError, match=f"^sampler 'broken' fails {message}"):
        testing.check("sampler", samplers.stepped(plan_fn), name="broken", example=example)


def test_every_shipped_sampler_was_registered_by_register_with_its_example():
    assert list(samplers.SAMPLERS) == ["ancestral", "ddim", "dpm_solver_2m", "ode"]
    assert samplers.SAMPLERS["ddim"] is samplers.ddim and samplers.build("ode") is samplers.ode
    assert samplers.SAMPLERS.entry("dpm_solver_2m").example == samplers.Example(deterministic=True)
    assert [dict(e.options) for e in sampler_checks.examples(samplers.SAMPLERS.entry("ddim").example)] == [
        {}, {"eta": 1.0}, {"spacing": "logsnr"}]


def _plan(rng, eps_fn, gamma_fn, batch, cond=None, *, num_steps: int) -> samplers.Plan:
    return samplers.ancestral.plan(rng, eps_fn, gamma_fn, batch, cond, num_steps=num_steps)


def _keyed(key, eps_fn, gamma_fn, batch, cond=None, *, num_steps: int):
    raise AssertionError("never called")


def _no_num_steps(rng, eps_fn, gamma_fn, batch, cond=None, *, eta: float = 0.0):
    raise AssertionError("never called")


def _required_option(rng, eps_fn, gamma_fn, batch, cond=None, *, num_steps: int, tau: float):
    raise AssertionError("never called")


@pytest.mark.parametrize("name,piece,example,message", [
    ("not_callable", 3, None, "sampler 'not_callable' does not meet the sampler contract: 3 is not callable"),
    ("ddim", _plan, None, r"sampler 'ddim' is already registered \(by vdm.samplers\)"),
    ("keyed", _keyed, None, r"sampler 'keyed' does not meet the sampler contract: its plan function must begin \(rng, eps_fn, gamma_fn, batch, cond, \.\.\.\); it begins "
                            r"\(key, eps_fn, gamma_fn, batch, cond\)"),
    ("no_steps", _no_num_steps, None, "sampler 'no_steps' does not meet the sampler contract: its plan function takes "
                                      "no num_steps keyword"),
    ("required", _required_option, None, "sampler 'required' does not meet the sampler contract: its option 'tau' has "
                                         "no default"),
    ("bad_example", _plan, {"eta": 1.0}, r"sampler 'bad_example': example=\{'eta': 1.0\}: must be a "),
])
def test_a_broken_registration_is_refused_and_nothing_is_added(name, piece, example, message):
    before = dict(samplers.SAMPLERS)
    with pytest.raises(registry.RegistrationError, match=f"^{message}"):
        samplers.register(name, example=example)(piece)
    with pytest.raises(registry.RegistrationError, match="has no .plan: register a plan function"):
        samplers.SAMPLERS.register("raw", _plan)  # a plan function itself: register() makes its sampler
    assert dict(samplers.SAMPLERS) == before
