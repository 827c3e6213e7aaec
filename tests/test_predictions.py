"""The parameterisations (eps, x, v, F, o): each loss is its converted eps-MSE, and each trains from the command line;
broken ones fail the contract (which runs on every registered one in test_contracts.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import parse_command_line

from vdm import diffusion, main, predictions, registry, schedules, testing, time_sampling, train, weightings


def _textbook(f, eps, gamma):
    """Each network's target and the factor k with ||eps - eps_hat||^2 = k ||target - out||^2, from the papers'
    own definitions (float64): x; v = alpha eps - sigma x; EDM's F with x = c_skip z / alpha + c_out F; o = eps - x."""
    g = gamma[:, None]
    alpha, sigma = np.sqrt(1 / (1 + np.exp(g))), np.sqrt(1 / (1 + np.exp(-g)))
    z = alpha * f + sigma * eps
    sd = predictions.SIGMA_DATA
    sigma_edm = sigma / alpha  # EDM's noise level: z / alpha = x + sigma_edm eps
    c_skip, c_out = sd ** 2 / (sigma_edm ** 2 + sd ** 2), sigma_edm * sd / np.sqrt(sigma_edm ** 2 + sd ** 2)
    return {
        "eps": (eps, np.ones_like(g)),
        "x": (f, alpha ** 2 / sigma ** 2),  # SNR
        "v": (alpha * eps - sigma * f, alpha ** 2),
        "F": ((f - c_skip * z / alpha) / c_out, (alpha * c_out / sigma) ** 2),
        "o": (eps - f, (alpha / (alpha + sigma)) ** 2),
    }


def test_each_parameterisations_loss_is_its_converted_eps_mse():
    rng = np.random.default_rng(3)
    f = rng.uniform(-1, 1, (16, 6))
    eps = rng.normal(size=f.shape)
    gamma = np.linspace(-6.0, 6.0, 16)
    out = rng.normal(size=f.shape)  # an arbitrary network output
    z = diffusion.diffuse(jnp.asarray(f, jnp.float32), jnp.asarray(gamma, jnp.float32), jnp.asarray(eps, jnp.float32))
    textbook = _textbook(f, eps, gamma)
    assert sorted(textbook) == sorted(predictions.PREDICTIONS)
    for name, (target, k) in textbook.items():
        eps_hat = np.asarray(predictions.to_eps(name, jnp.asarray(out, jnp.float32), z, jnp.asarray(gamma, jnp.float32)))
        np.testing.assert_allclose(np.sum((eps - eps_hat) ** 2, -1), k[:, 0] * np.sum((target - out) ** 2, -1),
                                   rtol=2e-3, err_msg=name)
        ours = predictions.prediction_target(name, jnp.asarray(f, jnp.float32), jnp.asarray(eps, jnp.float32),
                                             jnp.asarray(gamma, jnp.float32))
        np.testing.assert_allclose(np.asarray(ours), target, rtol=2e-3, atol=2e-4, err_msg=name)
        # The target is the output that makes eps_hat = eps.
        exact = predictions.to_eps(name, ours, z, jnp.asarray(gamma, jnp.float32))
        np.testing.assert_allclose(np.asarray(exact), eps, atol=2e-3, err_msg=name)
    with pytest.raises(ValueError, match="valid names: eps, x, v, F, o"):
        predictions.to_eps("score", out, z, gamma)


def _v_swapped(gamma, alpha, sigma):  # v's coefficients the wrong way round: eps_hat = alpha z + sigma v_hat
    return alpha, sigma


@pytest.mark.parametrize("piece, example, check", [
    (_v_swapped, predictions.PREDICTIONS.entry("v").example, "eps from its declared target"),
    (lambda gamma, alpha, sigma: (1.0 / sigma, 0.0 * gamma), None, "finite coefficients"),  # b = 0: no target
    (lambda gamma, alpha, sigma: (jnp.log(gamma), alpha), None, "finite coefficients"),  # log of gamma < 0
    (lambda gamma, alpha, sigma: (0.0, jnp.ones(7)), None, "shapes per example and per element"),
    (lambda gamma, alpha, sigma: (sigma, jnp.reshape(alpha, (alpha.shape[0], -1))), None,
     "shapes per example and per element"),  # b flattened: [B, 1] against gamma [B, 1, 1]
])
def test_a_broken_prediction_fails_the_check_it_breaks(piece, example, check):
    with pytest.raises(AssertionError, match=f"^prediction 'broken' fails {check}: "):
        testing.check("prediction", piece, name="broken", example=example)


def test_a_prediction_that_breaks_the_static_contract_is_refused_and_nothing_is_added():
    before = dict(predictions.PREDICTIONS)
    for piece in (lambda gamma, alpha: (0.0, 1.0), "eps"):
        with pytest.raises(registry.RegistrationError, match="^prediction 'new' does not meet the prediction contract: "):
            predictions.register("new")(piece)
    with pytest.raises(registry.RegistrationError, match="^prediction 'v' is already registered"):
        predictions.register("v")(_v_swapped)
    assert dict(predictions.PREDICTIONS) == before


def test_flow_matching_is_o_prediction_on_the_optimal_transport_path_with_its_weighting():
    """Kingma & Gao's App. D.3 in this code: on the path z' = (1 - s) x + s eps, the ``optimal_transport`` schedule
    at time t is s = s0 + (s1 - s0) t, and the flow-matching loss ||o - o_hat||^2 is the weighted eps loss
    0.5 w(lambda) (-dlambda/dt) ||eps - eps_hat||^2 with the ``flow_matching`` weighting over (s1 - s0) = ds/dt:
    the expected loss over t is flow matching's integral of ||o - o_hat||^2 over s in [s0, s1]."""
    g0, g1 = -10.0, 6.0
    schedule = schedules.build("optimal_transport", gamma_min=g0, gamma_max=g1)
    t = jnp.linspace(0.0, 1.0, 33)
    gamma, rate = jax.jvp(schedule, (t,), (jnp.ones_like(t),))
    s0, s1 = 1 / (1 + np.exp(-g0 / 2)), 1 / (1 + np.exp(-g1 / 2))
    s = s0 + (s1 - s0) * np.asarray(t, np.float64)
    np.testing.assert_allclose(np.asarray(gamma), 2 * np.log(s / (1 - s)), rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(np.asarray(gamma)) > 0)
    rng = np.random.default_rng(0)
    f, eps, out = (rng.normal(size=(33, 5)) for _ in range(3))
    z_path = (1 - s[:, None]) * f + s[:, None] * eps  # the OT path itself, then scaled to variance preserving
    z = jnp.asarray(z_path / np.sqrt((1 - s[:, None]) ** 2 + s[:, None] ** 2), jnp.float32)
    np.testing.assert_allclose(np.asarray(z), np.asarray(diffusion.diffuse(jnp.asarray(f, jnp.float32), gamma,
                                                                           jnp.asarray(eps, jnp.float32))), atol=1e-5)
    fm = np.sum((eps - f - out) ** 2, -1)  # ||o - o_hat||^2
    eps_hat = np.asarray(predictions.to_eps("o", jnp.asarray(out, jnp.float32), z, gamma))
    w = np.asarray(weightings.build("flow_matching")(-gamma))
    weighted = 0.5 * w * np.asarray(rate) * np.sum((eps - eps_hat) ** 2, -1)
    np.testing.assert_allclose(weighted, (s1 - s0) * fm, rtol=2e-3)


@pytest.mark.parametrize("overrides", [  # eps, the default, trains in most of the suite
    ["--config.model.prediction=x"],
    ["--config.model.prediction=v"],
    ["--config.model.prediction=F"],
    ["--config.model.prediction=o", "--config.model.schedule=optimal_transport", "--config.loss.weighting=flow_matching"],
], ids=lambda o: o[0].rsplit("=", 1)[1])
def test_each_parameterisation_trains_from_the_command_line_to_a_finite_bound(tmp_path, overrides):
    config, workdir, mode, _ = parse_command_line(
        ["--config", "configs/test.py", "--workdir", str(tmp_path), "--config.train.num_steps=2",
         "--config.eval.num_examples=16", "--config.sample.num_images=2", "--config.sample.steps=2", *overrides])
    assert (mode, config.model.prediction) == ("train", overrides[0].rsplit("=", 1)[1])
    result = train.train_and_evaluate(config, workdir)
    assert result["step"] == 2 and np.isfinite(result["bpd"]) and result["bpd"] > 0  # x at init: 3e5 bits/dim
    assert not main.non_finite(result)


def test_importance_sampling_weighs_the_networks_own_error_equally_as_i_dode_does_for_v():
    """With loss.importance_sampling = "weighting" the density is p(lambda) proportional to w(lambda) b(lambda)^2:
    for v with the elbo, alpha^2 = sigmoid(lambda), whose integral over a bin is a difference of softplus (i-DODE's
    closed form). Every example's v-error then has one weight, and the bound stays unbiased."""
    from vdm import analytic, objective as objective_lib

    lo, hi = -5.0, 13.3
    density = objective_lib.Objective(importance_sampling="weighting", logsnr_range=(lo, hi), density_bins=100,
                                      prediction="v").initial_density()
    edges = np.asarray(density.edges, np.float64)
    softplus = np.logaddexp(0.0, edges)
    np.testing.assert_allclose(np.asarray(density.mass), np.diff(softplus) / (softplus[-1] - softplus[0]), rtol=2e-3)
    eps_density = objective_lib.Objective(importance_sampling="weighting", logsnr_range=(lo, hi),
                                          density_bins=100).initial_density()
    np.testing.assert_allclose(np.asarray(eps_density.mass), 0.01, rtol=1e-5)  # eps: p ~ w = 1, uniform

    u = jnp.linspace(0.0, 1.0, 1001)[:-1] + 0.0005
    levels = time_sampling.noise_levels(u, None, logsnr_density=density)
    weight = np.asarray(levels.rate * predictions.prediction_error_scale("v", levels.gamma), np.float64)
    z_norm = softplus[-1] - softplus[0]  # i-DODE's Z: the weight of every v-error, 0.5 Z ||v - v_hat||^2
    # Constant up to the grid: within a bin alpha^2 changes by at most this factor, the density does not.
    within_bin = np.expm1(np.max(np.abs(np.diff(np.log(1 / (1 + np.exp(-edges)))))))
    assert np.max(np.abs(weight / z_norm - 1)) <= within_bin and within_bin < 0.2

    data = analytic.GaussianData(dim=4, scale=0.5)

    def v_fn(z, gamma, cond=None):  # the Bayes-optimal denoiser, as a v-prediction: v = (eps - sigma z) / alpha
        alpha, sigma = jnp.sqrt(jax.nn.sigmoid(-gamma))[:, None], jnp.sqrt(jax.nn.sigmoid(gamma))[:, None]
        return (data.eps_fn(z, gamma) - sigma * z) / alpha

    f = data.sample(jax.random.PRNGKey(0), 4096)
    loss = np.asarray(diffusion.diffusion_loss(jax.random.PRNGKey(1), f, None, v_fn, prediction="v",
                                               logsnr_density=density, time_sampler="iid"), np.float64)
    truth = data.continuous_loss(-hi, -lo)
    assert abs(loss.mean() - truth) < 4 * loss.std() / np.sqrt(loss.size), (loss.mean(), truth)
