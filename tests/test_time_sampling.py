"""Time samplers and log-SNR densities: contracts over the tables and exact distributions."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import analytic, diffusion, registry, schedules, time_sampling, weightings


def _ks_uniform(u):
    u = np.sort(np.asarray(u, np.float64))
    n = len(u)
    return max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))


@pytest.mark.parametrize("name", list(time_sampling.TIME_SAMPLERS))
def test_uniform_samplers_contract(name):
    sampler = time_sampling.build(name)
    u = jax.jit(sampler, static_argnums=1)(jax.random.PRNGKey(0), 4096)
    assert u.shape == (4096,) and u.dtype == jnp.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # Pooled over many batches, the marginal is U(0, 1): KS distance below the 0.1% critical value.
    pooled = jax.vmap(lambda k: sampler(k, 16))(jax.random.split(jax.random.PRNGKey(1), 1000)).ravel()
    assert _ks_uniform(pooled) < 1.95 / math.sqrt(pooled.size)
    # Each position in the batch is itself uniform (no bias for example i).
    first = jax.vmap(lambda k: sampler(k, 16)[5])(jax.random.split(jax.random.PRNGKey(2), 4000))
    assert _ks_uniform(first) < 1.95 / math.sqrt(4000)


def test_low_discrepancy_covers_every_stratum_exactly_once():
    u = np.asarray(time_sampling.low_discrepancy(jax.random.PRNGKey(3), 64))
    np.testing.assert_array_equal(np.sort(np.floor(u * 64)), np.arange(64))


def test_unknown_sampler_and_density_names():
    with pytest.raises(ValueError, match="valid names: iid, low_discrepancy"):
        time_sampling.build("sobol")
    with pytest.raises(ValueError, match="valid names: weighting, adaptive"):
        time_sampling.build_density("beta", weightings.build("elbo"), -5.0, 13.0)
    with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
        time_sampling.build_density("weighting", weightings.build("elbo"), 5.0, -5.0)


def test_samplers_and_densities_are_registries_that_refuse_a_wrong_signature_or_a_taken_name():
    before = (dict(time_sampling.TIME_SAMPLERS), dict(time_sampling.DENSITIES))
    with pytest.raises(registry.RegistrationError, match=r"^time sampler 'sobol' .*callable as \(rng, batch_size\)"):
        time_sampling.TIME_SAMPLERS.register("sobol", lambda rng: rng)
    with pytest.raises(registry.RegistrationError, match="^log-SNR density 'beta' .*callable as \\(weighting, "):
        time_sampling.DENSITIES.register("beta", lambda weighting: weighting)
    with pytest.raises(registry.RegistrationError, match="^time sampler 'iid' is already registered"):
        time_sampling.TIME_SAMPLERS.register("iid", time_sampling.iid)
    assert (dict(time_sampling.TIME_SAMPLERS), dict(time_sampling.DENSITIES)) == before


@pytest.mark.parametrize("name", list(time_sampling.DENSITIES))
@pytest.mark.parametrize("weighting", ["elbo", "sigmoid", "edm"])
def test_density_contract_inverse_cdf_is_exact(name, weighting):
    w = weightings.build(weighting)
    dens = time_sampling.build_density(name, w, -5.0, 13.3)
    mass = np.asarray(dens.mass)
    np.testing.assert_allclose(mass.sum(), 1.0, rtol=1e-5)
    u = jax.random.uniform(jax.random.PRNGKey(0), (20000,))
    lam, log_p = jax.jit(lambda d, u: d.sample(u))(dens, u)
    lam, log_p = np.asarray(lam), np.asarray(log_p)
    assert lam.min() >= -5.0 and lam.max() <= 13.3 and np.all(np.isfinite(log_p))
    np.testing.assert_allclose(log_p, dens.log_prob(jnp.asarray(lam)), rtol=1e-4, atol=1e-4)
    # The density integrates to one, and the samples follow its CDF (KS test).
    grid = np.linspace(-5.0, 13.3, 200001)
    pdf = np.exp(np.asarray(dens.log_prob(jnp.asarray(grid, jnp.float32)), np.float64))
    np.testing.assert_allclose(np.trapezoid(pdf, grid), 1.0, rtol=2e-3)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (pdf[1:] + pdf[:-1]) * np.diff(grid))])
    lam_sorted = np.sort(lam)
    model_cdf = np.interp(lam_sorted, grid, cdf)
    n = len(lam_sorted)
    ks = max(np.max(np.arange(1, n + 1) / n - model_cdf), np.max(model_cdf - np.arange(n) / n))
    assert ks < 1.95 / math.sqrt(n) + 2e-3


def test_adaptive_density_learns_the_integrand_and_lowers_variance(capsys):
    """Fed with the weighted integrand, the adaptive density approaches p ~ w E||eps - eps_hat||^2."""
    data = analytic.GaussianData(dim=16, scale=0.5)
    w = weightings.build("sigmoid", bias=2.0)
    sched = schedules.build("fixed_linear", gamma_min=-13.3, gamma_max=5.0)
    dens = time_sampling.build_density("adaptive", w, -5.0, 13.3, num_bins=40, decay=0.9)

    @jax.jit
    def step(dens, rng):
        f = data.sample(jax.random.fold_in(rng, 0), 256)
        loss, aux = diffusion.diffusion_loss(jax.random.fold_in(rng, 1), f, sched, data.eps_fn, weighting=w,
                                             logsnr_density=dens, return_aux=True)
        return dens.update(aux["logsnr"], loss * jnp.exp(aux["log_p"])), loss

    losses = []
    for i in range(150):
        dens, loss = step(dens, jax.random.PRNGKey(i))
        losses.append(np.asarray(loss))
    truth = data.weighted_loss(lambda lam: np.asarray(w(jnp.asarray(lam, jnp.float32)), np.float64), -5.0, 13.3)
    first, last = np.concatenate(losses[:10]), np.concatenate(losses[-10:])
    for batch in (first, last):  # unbiased before and after adapting
        assert abs(batch.mean() - truth) < 4 * batch.std() / math.sqrt(batch.size)
    with capsys.disabled():
        print(f"\n[adaptive density] per-example variance: p~w {first.var():.3f} -> adapted {last.var():.3f}")
    assert last.var() < 0.7 * first.var()
    # The adapted histogram has the shape of the integrand 0.5 w(lam) E||eps - eps_hat||^2.
    mid = 0.5 * (np.asarray(dens.edges[1:]) + np.asarray(dens.edges[:-1]))
    integrand = 0.5 * np.asarray(w(jnp.asarray(mid))) * data.eps_error(-mid)
    corr = np.corrcoef(np.asarray(dens.ema), integrand)[0, 1]
    assert corr > 0.95


def test_adaptive_density_validates_its_arguments():
    w = weightings.build("elbo")
    with pytest.raises(ValueError, match="uniform_mix"):
        time_sampling.build_density("adaptive", w, -5.0, 13.0, uniform_mix=0.0)
    with pytest.raises(ValueError, match="decay"):
        time_sampling.build_density("adaptive", w, -5.0, 13.0, decay=1.0)
