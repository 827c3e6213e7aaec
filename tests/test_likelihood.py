"""The probability-flow ODE likelihood and the discrete bounds, against closed forms."""
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from vdm import analytic, configlib, diffusion, likelihood, options, schedules

COV = np.array([[0.30, 0.18], [0.18, 0.20]])
DATA = analytic.CorrelatedGaussianData(COV)
G0, G1 = -8.0, 8.0
SCHED = schedules.build("cosine", gamma_min=G0, gamma_max=G1)


def test_exact_divergence_matches_the_closed_form_density_of_the_flow():
    f = DATA.sample(jax.random.PRNGKey(0), 32)
    result = jax.jit(lambda x: likelihood.ode_log_likelihood(jax.random.PRNGKey(1), x, SCHED, DATA.eps_fn,
                                                             divergence="exact", rtol=1e-6, atol=1e-6))(f)
    exact = DATA.flow_log_density(np.asarray(f), G0, G1)
    np.testing.assert_allclose(np.asarray(result.log_prob, np.float64), exact, atol=2e-3)
    assert int(result.nfe) > 10


def test_hutchinson_is_unbiased_within_its_standard_error():
    n = 512
    point = DATA.sample(jax.random.PRNGKey(2), 1)
    f = jnp.tile(point, (n, 1))  # one point, n independent probes
    est = jax.jit(lambda x: likelihood.ode_log_likelihood(jax.random.PRNGKey(3), x, SCHED, DATA.eps_fn,
                                                          rtol=1e-5, atol=1e-5))(f).log_prob
    est = np.asarray(est, np.float64)
    exact = DATA.flow_log_density(np.asarray(point), G0, G1)[0]
    se = est.std(ddof=1) / math.sqrt(n)
    assert est.std() > 1e-3  # the Jacobian is not diagonal: the probes do vary
    assert abs(est.mean() - exact) < 4 * se, (est.mean(), exact, se)


def _exact_discrete_nll(x, vocab_size, density):
    """-log P(x) = -log of the density integrated over x's bin, by a 200x200 midpoint rule (float64)."""
    half = 1.0 / vocab_size
    grid = (np.arange(200) + 0.5) / 200 * 2 * half - half
    out = []
    for row in np.asarray(x):
        centre = 2.0 * (row + 0.5) / vocab_size - 1.0
        pts = np.stack(np.meshgrid(centre[0] + grid, centre[1] + grid, indexing="ij"), -1).reshape(-1, 2)
        out.append(-math.log(density.pdf(pts).mean() * (2 * half) ** 2))
    return np.array(out)


@pytest.mark.parametrize("method", likelihood.DEQUANTIZATIONS)
def test_dequantized_bounds_are_upper_bounds_that_tighten_with_importance_samples(method):
    vocab = 16
    density = multivariate_normal(np.zeros(2), COV)
    x = jnp.asarray([[7, 8], [5, 9], [10, 6], [8, 8]])
    exact = _exact_discrete_nll(x, vocab, density)

    def log_density(rng, f):
        return jax.scipy.stats.multivariate_normal.logpdf(f, jnp.zeros(2), jnp.asarray(COV, jnp.float32)), 0

    bounds = {}
    for k in (1, 64):
        run = jax.jit(jax.vmap(lambda key, k=k: likelihood.discrete_nll(key, x, vocab, log_density,
                                                                         dequantization=method, num_samples=k,
                                                                         gamma_0=-5.0)[0]))
        draws = np.asarray(run(jax.random.split(jax.random.PRNGKey(0), 40)), np.float64)
        bounds[k] = (np.mean(draws, 0), np.std(draws, 0, ddof=1) / math.sqrt(40))
    mean1, se1 = bounds[1]
    mean64, se64 = bounds[64]
    assert np.all(mean1 > exact - 4 * se1 - 1e-6)  # an upper bound (in expectation)
    assert np.all(mean64 <= mean1 + 4 * se1)  # importance weighting tightens it
    np.testing.assert_allclose(mean64, exact, atol=0.02)  # and with 64 samples it is nearly exact


def test_truncated_normal_dequantization_density_integrates_to_one():
    vocab = 8
    x = jnp.full((1, 1), 3)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    f, log_q = jax.vmap(lambda k: likelihood.dequantize(k, x, vocab, "truncated_normal", gamma_0=-3.0))(keys)
    f, log_q = np.asarray(f).ravel(), np.asarray(log_q).ravel()
    lo, hi = 2 * 3 / vocab - 1, 2 * 4 / vocab - 1
    assert f.min() >= lo and f.max() <= hi  # inside the bin
    # E_q[1 / q] = bin width for a density on the bin (importance identity).
    np.testing.assert_allclose(np.mean(np.exp(-log_q)), hi - lo, rtol=0.05)


def test_unknown_options_are_named():
    with pytest.raises(options.OptionError, match="^divergence='trace': valid names: hutchinson, exact$"):
        likelihood.ode_log_likelihood(None, jnp.zeros((1, 2)), SCHED, DATA.eps_fn, divergence="trace")
    with pytest.raises(ValueError, match="^unknown dequantization 'gauss'; valid names: uniform, truncated_normal$"):
        likelihood.dequantize(None, jnp.zeros((1, 2), jnp.int32), 16, "gauss")
    with pytest.raises(options.OptionError, match="^rtol='abc': must be a finite number > 0$"):
        likelihood.ode_log_likelihood(None, jnp.zeros((1, 2)), SCHED, DATA.eps_fn, rtol="abc")
    with pytest.raises(options.OptionError, match="^num_probes=0: must be an integer >= 1$"):
        likelihood.ode_log_likelihood(None, jnp.zeros((1, 2)), SCHED, DATA.eps_fn, num_probes=0)
    with pytest.raises(options.OptionError, match="^num_samples=1.5: must be an integer >= 1$"):
        likelihood.discrete_nll(None, jnp.zeros((1, 2), jnp.int32), 16, None, num_samples=1.5)
    with pytest.raises(options.OptionError, match="^dequantization='gauss': valid names: uniform, truncated_normal$"):
        likelihood.discrete_nll(None, jnp.zeros((1, 2), jnp.int32), 16, None, dequantization="gauss")


def test_one_check_covers_every_option_of_the_ode_likelihood_and_of_config_eval_ode():
    """check_options is the one check: each keyword option of the two entry points and each
    field of config.eval.ode has its entry, and the names come from the registries."""
    taken = {name for fn in (likelihood.ode_log_likelihood, likelihood.discrete_nll)
             for name, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}
    assert taken - {"cond", "gamma_0", "on_time"} == set(likelihood.OPTIONS)  # not options: data, a callback
    assert set(configlib.base_config().eval.ode) <= set(likelihood.OPTIONS)
    assert set(likelihood.DIVERGENCES) == {"hutchinson", "exact"}
    assert set(likelihood.DEQUANTIZATIONS) == {"uniform", "truncated_normal"}
    likelihood.check_options(configlib.base_config().eval.ode.to_dict())  # the defaults pass


@pytest.mark.slow
def test_on_a_network_hutchinson_agrees_with_the_exact_divergence_and_eval_reports_both_bounds(tmp_path):
    """A second method on a real (non-linear) network: exact vs Hutchinson, then the trainer's eval."""
    import sys

    from flax import nnx

    sys.path.insert(0, "tests")
    from conftest import load_config

    from vdm import configlib, evaluation, train
    from vdm import model as model_lib

    config = load_config("test")
    model = model_lib.VDM.from_config(config, image_shape=(4, 4, 1), vocab_size=17, rngs=nnx.Rngs(0))
    x = jax.random.randint(jax.random.PRNGKey(0), (64, 4, 4, 1), 0, 17)
    batch = {"image": jnp.tile(x[:1], (64, 1, 1, 1))}
    kwargs = dict(rtol=1e-4, atol=1e-4)
    exact, _ = jax.jit(lambda b: evaluation.ode_nll(model, b, jax.random.PRNGKey(1), divergence="exact", **kwargs))(
        batch)
    hutch, nfe = jax.jit(lambda b: evaluation.ode_nll(model, b, jax.random.PRNGKey(1), **kwargs))(batch)
    exact, hutch = np.asarray(exact, np.float64), np.asarray(hutch, np.float64)
    # Same dequantisation draws (same key): only the divergence estimate differs, per example.
    se = hutch.std(ddof=1) / math.sqrt(len(hutch))
    assert abs(hutch.mean() - exact.mean()) < 4 * se + 1e-3 and int(nfe) > 0

    # The trainer's evaluation of both bounds, with the learned schedule per pixel (issue: the proof that a
    # per-element schedule goes through training, the VLB and the ODE): as --config.model.schedule=... sets it.
    config, _ = configlib.override(config, {"model.schedule": "per_pixel_polynomial", "train.num_steps": 2,
                                            "eval.num_examples": 16, "eval.method": "both", "sample.num_images": 2,
                                            "sample.steps": 2})
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    for name in ("bpd", "bpd_ode"):
        assert np.isfinite(result[name]) and 0 < result[f"{name}_se"] < result[name], name
    assert result["ode_nfe"] > 6 and result["count"] == 16
    trainer = train.Trainer(config, str(tmp_path / "run"), must_exist=True)
    try:
        trainer.restore_latest()
        endpoints = trainer.state.params["schedule"]["endpoints"]
    finally:
        trainer.close()
    assert endpoints["low"].shape == (8, 8, 1)  # one schedule per pixel of the 8x8 digits, and training moved them apart
    assert np.ptp(np.asarray(endpoints["low"])) > 0 and np.ptp(np.asarray(endpoints["width"])) > 0


def test_with_a_schedule_per_element_the_flow_density_is_its_closed_form():
    """Gaussian data N(0, s^2 I) with the Bayes-optimal denoiser and different endpoints and interiors per
    element: the probability-flow ODE (over t) gives each element the density N(0, v_0,i / v_1,i)."""
    from test_diffusion import per_element_schedule

    data = analytic.GaussianData(dim=3, scale=0.5)
    sched = per_element_schedule(3, seed=2)
    g0, g1 = (np.asarray(g, np.float64)[0] for g in sched.endpoints())
    f = data.sample(jax.random.PRNGKey(0), 16)
    result = jax.jit(lambda x: likelihood.ode_log_likelihood(jax.random.PRNGKey(1), x, sched, data.eps_fn,
                                                             divergence="exact", rtol=1e-6, atol=1e-6))(f)
    np.testing.assert_allclose(np.asarray(result.log_prob, np.float64), data.flow_log_density(np.asarray(f), g0, g1),
                               atol=2e-3)
    # A scalar schedule with the mean endpoints is a different model: the per-element endpoints are what count.
    assert np.max(np.abs(data.flow_log_density(np.asarray(f), g0.mean(), g1.mean())
                         - data.flow_log_density(np.asarray(f), g0, g1))) > 0.05


def test_every_evaluation_method_keeps_its_contract():
    """Each EVALUATIONS entry returns Evaluated: bounds and parts per example [B] in nats, keyed by the names the
    trainer reports them under (bpd...), counts as scalars, no name twice (traced only: no compilation)."""
    from flax import nnx

    from vdm import configlib, evaluation
    from vdm import model as model_lib

    config = configlib.base_config()
    model = model_lib.VDM(image_shape=(4, 4, 1), vocab_size=17, schedule="fixed_linear", gamma_min=-8.0,
                          gamma_max=5.0, network="mlp", network_kwargs={"hidden": 8, "depth": 1}, rngs=nnx.Rngs(0))
    batch = {"image": jnp.zeros((3, 4, 4, 1), jnp.int32)}
    for name, method in evaluation.EVALUATIONS.items():
        out = jax.eval_shape(lambda b, method=method: method(model, b, jax.random.PRNGKey(0), config.eval.to_dict()),
                             batch)
        assert isinstance(out, evaluation.Evaluated) and out.bounds, name
        for key, value in (out.bounds | out.parts).items():
            assert key.startswith("bpd") and value.shape == (3,), (name, key, value.shape)
        assert all(v.shape == () for v in out.counts.values()), name
        assert len({*out.bounds, *out.parts, *out.counts}) == len(out.bounds) + len(out.parts) + len(out.counts)


def test_truncated_normal_bound_lies_above_the_exact_discrete_nll_and_approaches_it_with_importance_samples():
    """Gaussian data under the exact flow (its density at t = 0 in closed form, N(0, v_0 / v_1) per element: see
    ``analytic.GaussianData.flow_log_density``), quantised to 16 levels: -log P(x) is a product of normal bin
    masses. The truncated-normal dequantised bound (scale exp(gamma_0 / 2), narrower than a bin) lies above it by
    five standard errors with one sample, and with 64 importance samples within an eighth of that gap, above it."""
    from scipy.stats import norm as scipy_norm

    data, vocab, gamma_0, gamma_1 = analytic.GaussianData(dim=3, scale=0.5), 16, -6.0, 5.0

    def v(g):
        return data.scale**2 / (1 + np.exp(g)) + 1 / (1 + np.exp(-g))

    sd = math.sqrt(v(gamma_0) / v(gamma_1))
    n = 2000
    x = diffusion.decode(sd * jax.random.normal(jax.random.PRNGKey(0), (n, data.dim)), vocab)
    centre, half = np.asarray(diffusion.encode(x, vocab), np.float64), 1.0 / vocab
    exact = -np.sum(np.log(scipy_norm.cdf((centre + half) / sd) - scipy_norm.cdf((centre - half) / sd)), axis=-1)

    def log_density(key, f):  # the exact flow's density of the continuous points
        return jnp.sum(-0.5 * jnp.log(2 * jnp.pi * sd**2) - 0.5 * jnp.square(f) / sd**2, axis=-1), 0

    gaps = {}
    for k in (1, 64):
        bound, _ = likelihood.discrete_nll(jax.random.PRNGKey(1), x, vocab, log_density,
                                           dequantization="truncated_normal", num_samples=k, gamma_0=gamma_0)
        d = np.asarray(bound, np.float64) - exact
        gaps[k] = (d.mean(), d.std(ddof=1) / math.sqrt(n))
    (gap_1, se_1), (gap_64, se_64) = gaps[1], gaps[64]
    assert gap_1 > 5 * se_1
    assert -3 * se_64 < gap_64 < gap_1 / 8
