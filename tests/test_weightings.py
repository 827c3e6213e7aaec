"""Weightings: the flags of the shipped ones, broken ones refused by the contract, and each named objective's identity
(the contract itself runs on every registered weighting in test_contracts.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm import analytic, diffusion, registry, schedules, testing, weightings

LAM = jnp.linspace(-20.0, 20.0, 4001)


def test_the_shipped_flags_are_exact_a_weighting_not_declared_monotonic_rises_somewhere():
    """The contract (``vdm.testing.weighting``, run on every weighting by test_contracts.py) checks that a declared
    flag holds; for the shipped weightings the flags are also the whole truth."""
    for name, w in weightings.WEIGHTINGS.items():
        values = np.asarray(w(LAM))
        non_increasing = bool(np.all(np.diff(values) <= 1e-7 * np.abs(values[:-1])))
        assert non_increasing == w.monotonic, f"{name}: monotonic flag {w.monotonic}, data says {non_increasing}"
    assert weightings.WEIGHTINGS["sigmoid"].fn is weightings.sigmoid  # register returns the function unchanged


def _broken(fn, monotonic=False, is_elbo=False):
    return weightings.Weighting("broken", fn, monotonic, is_elbo)


@pytest.mark.parametrize("piece, check", [
    (_broken(lambda logsnr: jnp.exp(0.1 * logsnr), monotonic=True), "declared monotonicity"),  # rises
    (_broken(weightings.sigmoid, monotonic=True, is_elbo=True), "declared is_elbo"),  # not 1
    (_broken(lambda logsnr: jnp.ones_like(logsnr)), "declared is_elbo"),  # 1 but not declared
    (_broken(lambda logsnr: jnp.tanh(logsnr) + 1.0), "finiteness and positivity"),  # 0 at the low end
    (_broken(lambda logsnr: jnp.float32(1.5)), "jit, float32 and shapes"),  # a scalar for a grid
    (_broken(lambda logsnr: jnp.exp(-logsnr).astype(jnp.bfloat16)), "jit, float32 and shapes"),
    (_broken(lambda logsnr: jnp.asarray(np.exp(-np.asarray(logsnr)))), "jit, float32 and shapes"),  # not traceable
    (_broken(lambda logsnr, bias=0.0: jnp.exp(bias - logsnr)), "its example parameters"),  # {"scale": 2.0}
])
def test_a_broken_weighting_fails_the_check_it_breaks(piece, check):
    with pytest.raises(AssertionError, match=f"^weighting 'broken' fails {check}: "):
        testing.check("weighting", piece, name="broken", example={"scale": 2.0} if "example" in check else None)


def test_a_weighting_that_breaks_the_static_contract_is_refused_and_nothing_is_added():
    before = dict(weightings.WEIGHTINGS)
    for fn, flags, problem in [
        (lambda x: x, {}, "first parameter must be the positional 'logsnr'"),
        (lambda logsnr, bias: logsnr, {}, "parameter 'bias' needs a default"),
        (lambda logsnr, **kw: logsnr, {}, "name each parameter"),
        (weightings.sigmoid, {"is_elbo": True}, "is_elbo .* needs monotonic=True"),
    ]:
        with pytest.raises(registry.RegistrationError, match=f"^weighting 'new' does not meet the weighting contract: "
                                                            f".*{problem}"):
            weightings.register("new", monotonic=flags.get("monotonic", False), **flags)(fn)
    with pytest.raises(registry.RegistrationError, match="monotonic=1 must be a bool"):
        weightings.register("new", monotonic=1)(weightings.sigmoid)
    with pytest.raises(registry.RegistrationError, match="^weighting 'sigmoid' is already registered"):
        weightings.register("sigmoid", monotonic=True)(weightings.sigmoid)
    assert dict(weightings.WEIGHTINGS) == before


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
