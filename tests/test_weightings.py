"""Weightings: contract over the table, monotonicity flags, and each named objective's identity."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import analytic, diffusion, schedules, weightings

LAM = jnp.linspace(-20.0, 20.0, 4001)


@pytest.mark.parametrize("name", list(weightings.WEIGHTINGS))
def test_contract_positive_finite_jittable_and_monotonic_flag_is_true(name):
    w = weightings.build(name)
    values = np.asarray(jax.jit(w)(LAM))
    assert values.shape == LAM.shape and np.all(np.isfinite(values)) and np.all(values > 0)
    non_increasing = bool(np.all(np.diff(values) <= 1e-7 * np.abs(values[:-1])))
    assert non_increasing == w.monotonic, f"{name}: monotonic flag {w.monotonic}, data says {non_increasing}"
    grad = jax.grad(lambda lam: jnp.sum(w(lam)))(LAM)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_build_errors_name_the_valid_choices():
    with pytest.raises(ValueError, match="valid names: elbo, sigmoid"):
        weightings.build("uniform")
    with pytest.raises(ValueError, match="takes parameters"):
        weightings.build("elbo", bias=1.0)
    assert weightings.build("sigmoid", bias=-1.0)(jnp.float32(-1.0)) == pytest.approx(0.5)


def test_edm_monotonic_equals_edm_above_its_peak_and_its_max_below():
    edm, mono = np.asarray(weightings.edm(LAM)), np.asarray(weightings.edm_monotonic(LAM))
    peak = int(np.argmax(edm))
    np.testing.assert_allclose(mono[peak + 1:], edm[peak + 1:], rtol=1e-6)
    np.testing.assert_allclose(mono[:peak], edm.max(), rtol=1e-4)


# Each weighting equals its named objective, computed in that objective's own parameterisation
# with the Bayes-optimal predictor for Gaussian data (so the two sides share no code).
S2 = 0.25
DATA = analytic.GaussianData(dim=1, scale=math.sqrt(S2))


def _native_objective(name, n=400001):
    """E_t[native loss] by quadrature, with the native Bayes-optimal prediction error."""
    t = (np.arange(n) + 0.5) / n
    if name == "eps_mse":  # DDPM cosine: alpha = cos(pi t / 2), sigma = sin(pi t / 2); ||eps - eps_hat||^2
        a2, s2 = np.cos(np.pi * t / 2) ** 2, np.sin(np.pi * t / 2) ** 2
        return np.mean(a2 * S2 / (a2 * S2 + s2))
    if name == "v_mse":  # v = alpha eps - sigma x: Var(v | z) = 1 - Cov(v, z)^2 / Var(z), Cov(v, z) = alpha sigma (1 - s^2)
        a2, s2 = np.cos(np.pi * t / 2) ** 2, np.sin(np.pi * t / 2) ** 2
        var_v = a2 + s2 * S2
        return np.mean(var_v - a2 * s2 * (1 - S2) ** 2 / (a2 * S2 + s2))
    if name == "flow_matching":  # z = (1 - t) x + t eps, u = eps - x: Var(u | z)
        var_z = (1 - t) ** 2 * S2 + t**2
        cov = t - (1 - t) * S2
        return np.mean(1 + S2 - cov**2 / var_z)
    raise KeyError(name)


@pytest.mark.parametrize("name", ["eps_mse", "v_mse", "flow_matching"])
def test_weighting_equals_its_named_objective(name):
    w = weightings.build(name)
    ours = DATA.weighted_loss(lambda lam: np.asarray(w(jnp.asarray(lam, jnp.float32)), np.float64), -30.0, 30.0)
    np.testing.assert_allclose(ours, _native_objective(name), rtol=2e-3)


def test_edm_weighting_equals_the_edm_loss():
    # EDM: log sigma ~ N(-1.2, 1.2^2), loss lambda(sigma) ||D(x + sigma n) - x||^2 with
    # lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 and the Bayes D: E||x - D||^2 = s^2 sigma^2 / (s^2 + sigma^2).
    sd = 0.5
    log_sigma = np.linspace(-1.2 - 12 * 1.2, -1.2 + 12 * 1.2, 400001)
    pdf = np.exp(-0.5 * ((log_sigma + 1.2) / 1.2) ** 2) / (1.2 * math.sqrt(2 * math.pi))
    sigma2 = np.exp(2 * log_sigma)
    edm = np.trapezoid(pdf * (sigma2 + sd**2) / (sigma2 * sd**2) * S2 * sigma2 / (S2 + sigma2), log_sigma)
    w = weightings.build("edm")
    ours = DATA.weighted_loss(lambda lam: np.asarray(w(jnp.asarray(lam, jnp.float32)), np.float64), -40.0, 40.0)
    np.testing.assert_allclose(ours, edm, rtol=2e-3)


def test_weighted_diffusion_loss_estimates_the_weighted_integral():
    # End to end through diffusion_loss (uniform t on a linear schedule) for every weighting.
    data = analytic.GaussianData(dim=4, scale=0.5)
    sched = schedules.build("fixed_linear", gamma_min=-10.0, gamma_max=10.0)
    f = data.sample(jax.random.PRNGKey(0), 2**15)
    for name in weightings.WEIGHTINGS:
        w = weightings.build(name)
        loss = np.asarray(diffusion.diffusion_loss(jax.random.PRNGKey(1), f, sched, data.eps_fn,
                                                   weighting=w, time_sampler="iid"), np.float64)
        truth = data.weighted_loss(lambda lam: np.asarray(w(jnp.asarray(lam, jnp.float32)), np.float64), -10.0, 10.0)
        se = loss.std() / math.sqrt(len(loss))
        assert abs(loss.mean() - truth) < 4 * se, f"{name}: {loss.mean():.4f} vs {truth:.4f} (se {se:.4f})"
