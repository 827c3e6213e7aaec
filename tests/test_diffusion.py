"""The diffusion math against closed forms (Gaussian data, Bayes-optimal denoiser)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdm import analytic, diffusion, schedules, time_sampling, weightings

G0, G1 = -13.3, 5.0
DATA = analytic.GaussianData(dim=4, scale=0.5)


def _loss(rng, schedule, batch, **kw):
    f = DATA.sample(jax.random.fold_in(rng, 1), batch)
    fn = jax.jit(lambda r, f: diffusion.diffusion_loss(r, f, schedule, DATA.eps_fn, **kw))
    return np.asarray(fn(jax.random.fold_in(rng, 2), f), np.float64)


def _batch_means(schedule, num_batches, batch, seed=0, data=DATA, **kw):
    """Means of `num_batches` independent batches (for estimators whose examples are correlated)."""
    f_all = data.sample(jax.random.PRNGKey(seed), num_batches * batch).reshape(num_batches, batch, -1)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), num_batches)
    fn = jax.jit(jax.vmap(lambda r, f: diffusion.diffusion_loss(r, f, schedule, data.eps_fn, **kw).mean()))
    return np.asarray(fn(keys, f_all), np.float64)


def _within(estimates, truth, n_se=4.0):
    mean, se = estimates.mean(), estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert abs(mean - truth) < n_se * se, f"mean {mean:.4f} vs truth {truth:.4f} (se {se:.4f})"
    return mean, se


# --------------------------------------------------------------------------------------
# Encoding, forward process, prior and decoder
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("vocab", [256, 17, 2])
def test_encode_decode_roundtrip_and_bin_centres(vocab):
    x = jnp.arange(vocab)
    f = diffusion.encode(x, vocab)
    np.testing.assert_allclose(f, (2 * np.arange(vocab) + 1) / vocab - 1, atol=1e-6)
    assert float(f.min()) > -1 and float(f.max()) < 1
    np.testing.assert_array_equal(diffusion.decode(f, vocab), x)
    # Anything within half a bin decodes to the same value.
    np.testing.assert_array_equal(diffusion.decode(f + 0.49 * 2 / vocab, vocab), x)


def test_alpha_sigma_variance_preserving_and_safe_at_extremes():
    gamma = jnp.linspace(-20.0, 20.0, 81)
    alpha, sigma = diffusion.alpha_sigma(gamma)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
    np.testing.assert_allclose(jnp.log(alpha**2) - jnp.log(sigma**2), -gamma, rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(sigma) > 0) and np.all(np.asarray(alpha) > 0)


@pytest.mark.parametrize("gamma_1", [-2.0, 1.0, 5.0, 12.0])
def test_prior_kl_matches_numerical_integral(gamma_1):
    f = np.array([-0.9, 0.0, 0.3, 0.99])
    alpha, sigma = math.sqrt(1 / (1 + math.exp(gamma_1))), math.sqrt(1 / (1 + math.exp(-gamma_1)))
    z = np.linspace(-12, 12, 400001)
    expected = 0.0
    for fi in f:
        log_q = -0.5 * ((z - alpha * fi) / sigma) ** 2 - math.log(sigma * math.sqrt(2 * math.pi))
        log_p = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
        expected += np.trapezoid(np.exp(log_q) * (log_q - log_p), z)
    got = float(diffusion.prior_kl(jnp.asarray(f[None], jnp.float32), jnp.float32(gamma_1))[0])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("vocab", [256, 17])
@pytest.mark.parametrize("gamma_0", [-13.3, -8.0, -3.0, 2.0])
def test_decoder_probabilities_sum_to_one_and_match_numpy(vocab, gamma_0):
    z0 = jax.random.uniform(jax.random.PRNGKey(0), (3, 5), minval=-1.2, maxval=1.2)
    log_probs = diffusion.decoder_log_probs(z0, jnp.float32(gamma_0), vocab)
    assert log_probs.shape == (3, 5, vocab)
    np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, atol=1e-5)
    # Second method: normalise the Gaussian densities of z_0 around alpha_0 * c_k in float64.
    a2 = 1 / (1 + math.exp(gamma_0))
    centres = (2 * np.arange(vocab) + 1) / vocab - 1
    dens = -0.5 * (np.asarray(z0, np.float64)[..., None] - math.sqrt(a2) * centres) ** 2 / (1 - a2)
    ref = dens - np.log(np.exp(dens - dens.max(-1, keepdims=True)).sum(-1, keepdims=True)) - dens.max(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(log_probs, np.float64), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("vocab", [256, 17])
def test_reconstruction_nll_and_its_derivatives_match_the_normalised_table(vocab):
    # Second method: gather log p(x | z_0) from the full log-softmax table and let JAX differentiate it.
    x = jax.random.randint(jax.random.PRNGKey(0), (5, 4, 4, 1), 0, vocab)
    gamma_0 = jnp.array([-13.3, -9.0, -5.0, 0.0, 4.0])
    rng = jax.random.PRNGKey(1)

    def by_table(g):
        f = diffusion.encode(x, vocab)
        log_probs = diffusion.decoder_log_probs(diffusion.diffuse(f, g, jax.random.normal(rng, f.shape)), g, vocab)
        picked = jnp.take_along_axis(log_probs, x[..., None], axis=-1)[..., 0]
        return -picked.reshape(5, -1).sum(-1)

    def fast(g):
        return diffusion.reconstruction_nll(rng, x, g, vocab)

    want, got = by_table(gamma_0), fast(gamma_0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    tangent = jnp.linspace(0.5, 1.5, 5)
    # Reverse mode (training) and forward mode (the custom JVP itself).
    np.testing.assert_allclose(jax.grad(lambda g: fast(g) @ tangent)(gamma_0),
                               jax.grad(lambda g: by_table(g) @ tangent)(gamma_0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(jax.jvp(fast, (gamma_0,), (tangent,))[1],
                               jax.jvp(by_table, (gamma_0,), (tangent,))[1], rtol=1e-4, atol=1e-3)


def test_reconstruction_is_nearly_free_at_low_noise_and_costly_at_high_noise():
    x = jax.random.randint(jax.random.PRNGKey(0), (64, 8, 8, 1), 0, 256)
    low = diffusion.reconstruction_nll(jax.random.PRNGKey(1), x, -13.3, 256)
    high = diffusion.reconstruction_nll(jax.random.PRNGKey(1), x, 3.0, 256)
    # At gamma_0 = -13.3 the noise std is 0.0013 << half a bin (0.0039): error prob ~ 0.3%.
    assert float(low.mean()) / 64 < 0.02
    # At gamma_0 = 3 the decoder is nearly uniform over 256 values: close to log(256) per dim.
    assert 0.8 * math.log(256) < float(high.mean()) / 64 <= math.log(256) + 0.1


# --------------------------------------------------------------------------------------
# The diffusion term against closed forms
# --------------------------------------------------------------------------------------

SCHEDULE_SHAPES = {
    "fixed_linear": {},
    "cosine": {},
    "shifted_cosine": {"shift": -3.0},
    "monotone_net": {"hidden": 8, "learn_endpoints": False},
}


def _schedule(name):
    sched = schedules.build(name, gamma_min=G0, gamma_max=G1, rngs=nnx.Rngs(7), **SCHEDULE_SHAPES[name])
    if name == "monotone_net":  # a visibly non-linear shape: weaken the linear part
        sched.slope[...] = jnp.float32(-2.0)
        sched.w3[...] = sched.w3[...] + 3.0
    return sched


def test_continuous_loss_is_invariant_to_the_schedule_but_its_variance_is_not(capsys):
    truth = DATA.continuous_loss(G0, G1)
    variances = {}
    for name in SCHEDULE_SHAPES:
        losses = _loss(jax.random.PRNGKey(11), _schedule(name), 2**16, time_sampler="iid")
        _within(losses, truth)
        variances[name] = losses.var()
    with capsys.disabled():
        print("\n[invariance] E[L_inf] closed form %.3f nats; per-example variance by schedule: %s"
              % (truth, ", ".join(f"{k}={v:.1f}" for k, v in variances.items())))
    # The variances differ far beyond sampling error (their ratio is > 10 here).
    assert max(variances.values()) > 10 * min(variances.values())


def test_low_discrepancy_is_unbiased_with_lower_variance_than_iid(capsys):
    # 64 dimensions, so that the spread over t (which the sampler addresses) dominates the
    # spread over eps and x (which it cannot), as in images.
    data = analytic.GaussianData(dim=64, scale=0.5)
    truth = data.continuous_loss(G0, G1)
    sched = _schedule("fixed_linear")
    iid = _batch_means(sched, 400, 64, data=data, time_sampler="iid")
    ld = _batch_means(sched, 400, 64, data=data, time_sampler="low_discrepancy")
    _within(iid, truth)
    _within(ld, truth)
    with capsys.disabled():
        print(f"\n[time sampler] variance of the batch-64 mean: iid {iid.var(ddof=1):.3f}, "
              f"low-discrepancy {ld.var(ddof=1):.3f}")
    # F-test at 400 batches: a ratio of 1.5 is far outside sampling noise (p < 1e-4).
    assert iid.var(ddof=1) > 1.5 * ld.var(ddof=1)


def _linear_np(t):
    return G0 + (G1 - G0) * t


def test_discrete_time_loss_matches_closed_form_decreases_in_T_and_tends_to_L_inf():
    sched = _schedule("fixed_linear")
    steps = [1, 2, 4, 16, 64, 1000]
    closed = [DATA.discrete_loss(_linear_np, T) for T in steps]
    l_inf = DATA.continuous_loss(G0, G1)
    # The closed forms (independent float64 NumPy) decrease in T and approach L_inf.
    assert all(a > b for a, b in zip(closed, closed[1:]))
    assert 0 < closed[-1] - l_inf < 0.01 * l_inf
    estimates = []
    for T, truth in zip(steps, closed):
        means = _batch_means(sched, 200, 64, num_steps=T, time_sampler="low_discrepancy")
        estimates.append(_within(means, truth))
    # The estimates themselves are non-increasing in T, up to their standard errors.
    for (m1, s1), (m2, s2) in zip(estimates, estimates[1:]):
        assert m2 < m1 + 4 * math.hypot(s1, s2)


def test_discrete_time_rejects_non_elbo_weighting_and_importance_sampling():
    sched = _schedule("fixed_linear")
    f = DATA.sample(jax.random.PRNGKey(0), 8)
    with pytest.raises(ValueError, match="elbo"):
        diffusion.diffusion_loss(jax.random.PRNGKey(0), f, sched, DATA.eps_fn, num_steps=10, weighting="sigmoid")
    dens = time_sampling.build_density("weighting", weightings.build("elbo"), -G1, -G0)
    with pytest.raises(ValueError, match="continuous time"):
        diffusion.diffusion_loss(jax.random.PRNGKey(0), f, sched, DATA.eps_fn, num_steps=10, logsnr_density=dens)


@pytest.mark.parametrize("name,params", [("sigmoid", {"bias": 2.0}), ("edm", {}), ("v_mse", {})])
def test_uniform_time_and_importance_sampled_logsnr_agree_in_mean(name, params):
    w = weightings.build(name, **params)
    truth = DATA.weighted_loss(lambda lam: np.asarray(w(lam)), -G1, -G0)
    uniform = _batch_means(_schedule("cosine"), 300, 64, weighting=w, time_sampler="iid")
    dens = time_sampling.build_density("weighting", w, -G1, -G0)
    importance = _batch_means(_schedule("cosine"), 300, 64, weighting=w, time_sampler="iid", logsnr_density=dens)
    m_u, s_u = _within(uniform, truth)
    m_i, s_i = _within(importance, truth)
    assert abs(m_u - m_i) < 4 * math.hypot(s_u, s_i)


def test_elbo_weighting_with_importance_sampling_equals_L_inf():
    truth = DATA.continuous_loss(G0, G1)
    dens = time_sampling.build_density("weighting", weightings.build("elbo"), -G1, -G0)
    _within(_batch_means(_schedule("fixed_linear"), 300, 64, logsnr_density=dens), truth)


# --------------------------------------------------------------------------------------
# Parameterisations (their conversions: tests/test_predictions.py)
# --------------------------------------------------------------------------------------


def test_diffusion_loss_with_x_prediction_of_the_bayes_denoiser_equals_eps_version():
    f = DATA.sample(jax.random.PRNGKey(0), 512)
    # Keep gamma where float32 division by sigma is benign: endpoints [-6, 5].
    sched6 = schedules.build("fixed_linear", gamma_min=-6.0, gamma_max=5.0)
    a = diffusion.diffusion_loss(jax.random.PRNGKey(1), f, sched6, DATA.eps_fn)
    b = diffusion.diffusion_loss(jax.random.PRNGKey(1), f, sched6, DATA.x_fn, prediction="x")
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-4)
    # ... and both estimate the closed form for these endpoints.
    assert abs(float(a.mean()) - DATA.continuous_loss(-6.0, 5.0)) < 4 * float(a.std()) / math.sqrt(512)


# --------------------------------------------------------------------------------------
# The whole bound
# --------------------------------------------------------------------------------------


def test_the_bound_takes_declared_endpoints_and_a_plain_function_as_a_function_schedule():
    sched = _schedule("fixed_linear")
    np.testing.assert_allclose([float(g) for g in diffusion.schedule_endpoints(sched)], [G0, G1], rtol=1e-6)
    line = diffusion.FunctionSchedule(lambda t: G0 + (G1 - G0) * t)
    assert isinstance(line, diffusion.DeclaresEndpoints) and not isinstance(line.fn, diffusion.DeclaresEndpoints)
    np.testing.assert_allclose([float(g) for g in line.endpoints()], [G0, G1], rtol=1e-6)
    per_element = diffusion.FunctionSchedule(lambda t: jnp.broadcast_to(G0 + (G1 - G0) * t[:, None], (t.shape[0], 3)))
    assert [g.shape for g in diffusion.schedule_endpoints(per_element)] == [(1, 3), (1, 3)]
    x = jax.random.randint(jax.random.PRNGKey(0), (4, 2, 2, 1), 0, 256)
    zero_net = lambda z, g, c: jnp.zeros_like(z)  # noqa: E731
    a, b = (diffusion.vlb(jax.random.PRNGKey(1), x, s, zero_net) for s in (sched, line))
    for name in ("prior", "reconstruction", "diffusion"):
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, err_msg=name)
    with pytest.raises(TypeError, match="declares endpoints.*FunctionSchedule"):
        diffusion.vlb(jax.random.PRNGKey(1), x, line.fn, zero_net)


def test_vlb_terms_sum_and_bits_per_dim():
    x = jax.random.randint(jax.random.PRNGKey(0), (8, 4, 4, 1), 0, 256)
    sched = _schedule("fixed_linear")
    zero_net = lambda z, g, c: jnp.zeros_like(z)  # noqa: E731
    terms = jax.jit(lambda r, x: diffusion.vlb(r, x, sched, zero_net))(jax.random.PRNGKey(1), x)
    np.testing.assert_allclose(terms["total"], terms["prior"] + terms["reconstruction"] + terms["diffusion"], rtol=1e-6)
    np.testing.assert_allclose(terms["bpd"], terms["total"] / (16 * math.log(2)), rtol=1e-6)
    # The prior term is the closed form at gamma_1 = 5 for this data.
    f = np.asarray(diffusion.encode(x), np.float64).reshape(8, -1)
    a2 = 1 / (1 + math.exp(G1))
    prior = 0.5 * np.sum(a2 * (f**2 - 1) + math.log1p(math.exp(-G1)), -1)
    np.testing.assert_allclose(terms["prior"], prior, rtol=1e-4)
    # eps_hat = 0 makes E||eps - eps_hat||^2 = dims, so E[diffusion] = 0.5 * 16 * (G1 - G0)
    many = jax.random.randint(jax.random.PRNGKey(2), (4096, 4, 4, 1), 0, 256)
    d = np.asarray(diffusion.vlb(jax.random.PRNGKey(3), many, sched, zero_net, time_sampler="iid")["diffusion"])
    _within(d, 0.5 * 16 * (G1 - G0))


# --------------------------------------------------------------------------------------
# A schedule per element: the closed forms hold element by element
# --------------------------------------------------------------------------------------


def per_element_schedule(dim: int, seed: int, gamma_min=-10.0, gamma_max=6.0):
    """The shipped per-pixel schedule with random endpoints and a random monotone interior per element."""
    sched = schedules.build("per_pixel_polynomial", gamma_min=gamma_min, gamma_max=gamma_max, data_shape=(dim,))
    rng = np.random.default_rng(seed)
    for name in ("a", "b", "c"):
        getattr(sched, name)[...] = jnp.asarray(rng.normal(size=dim) * 2, jnp.float32)
    sched.endpoints.low[...] = jnp.asarray(rng.uniform(gamma_min, gamma_min + 4, dim), jnp.float32)
    sched.endpoints.width[...] = jnp.asarray(rng.uniform(8, 14, dim), jnp.float32)
    return sched


def test_per_element_schedule_continuous_loss_is_the_sum_of_per_element_closed_forms_whatever_the_interiors():
    """E[L_inf] = sum_i 0.5 log((1 + SNR_max,i s^2) / (1 + SNR_min,i s^2)) with different endpoints and interiors
    per element; two different interiors with the same endpoints give the same mean; L_T lies above it and
    matches its own closed form."""
    data = analytic.GaussianData(dim=6, scale=0.5)
    first, second = per_element_schedule(6, seed=0), per_element_schedule(6, seed=1)
    second.endpoints.low[...], second.endpoints.width[...] = first.endpoints.low[...], first.endpoints.width[...]
    g0, g1 = (np.asarray(g, np.float64)[0] for g in first.endpoints())
    assert np.ptp(g0) > 1 and np.ptp(g1) > 1  # the elements really differ
    truth = data.continuous_loss(g0, g1)
    for sched in (first, second):
        _within(_batch_means(sched, 300, 64, data=data, time_sampler="low_discrepancy"), truth)
    steps = 8
    grid = np.asarray(first(jnp.arange(steps + 1, dtype=jnp.float32) / steps), np.float64)  # [T + 1, 6]
    discrete = data.discrete_loss(lambda t: grid[np.rint(t * steps).astype(int)], steps)
    assert discrete > truth + 0.05
    _within(_batch_means(first, 300, 64, data=data, num_steps=steps), discrete)
