"""The parameterisations (eps, x, v, F, o): each loss is its converted eps-MSE, and each trains from the command line."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from vdm import diffusion, main, predictions, schedules, train, weightings


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
        eps_hat = np.asarray(diffusion.to_eps(name, jnp.asarray(out, jnp.float32), z, jnp.asarray(gamma, jnp.float32)))
        np.testing.assert_allclose(np.sum((eps - eps_hat) ** 2, -1), k[:, 0] * np.sum((target - out) ** 2, -1),
                                   rtol=2e-3, err_msg=name)
        ours = diffusion.prediction_target(name, jnp.asarray(f, jnp.float32), jnp.asarray(eps, jnp.float32),
                                           jnp.asarray(gamma, jnp.float32))
        np.testing.assert_allclose(np.asarray(ours), target, rtol=2e-3, atol=2e-4, err_msg=name)
        # The target is the output that makes eps_hat = eps.
        exact = diffusion.to_eps(name, ours, z, jnp.asarray(gamma, jnp.float32))
        np.testing.assert_allclose(np.asarray(exact), eps, atol=2e-3, err_msg=name)
    with pytest.raises(ValueError, match="valid names: eps, x, v, F, o"):
        diffusion.to_eps("score", out, z, gamma)


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
    eps_hat = np.asarray(diffusion.to_eps("o", jnp.asarray(out, jnp.float32), z, gamma))
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
    argv = ["vdm.main", "--config", "configs/test.py", "--workdir", str(tmp_path), "--config.train.num_steps=2",
            "--config.eval.num_examples=16", "--config.sample.num_images=2", "--config.sample.num_steps=2", *overrides]
    flag_values = flags.FlagValues()
    main.define_flags(flag_values, argv)
    main.parse(argv, flag_values)
    config, workdir, mode, _ = main.resolve(flag_values)
    assert (mode, config.model.prediction) == ("train", overrides[0].rsplit("=", 1)[1])
    result = train.train_and_evaluate(config, workdir)
    assert result["step"] == 2 and np.isfinite(result["bpd"]) and result["bpd"] > 0  # x at init: 3e5 bits/dim
    assert not main.non_finite(result)
