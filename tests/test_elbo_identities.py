"""Two identities of the notes this library follows, each against a direct computation on Gaussian data.

1. Kingma & Gao 2023, Theorem 1: for a weighting w(lambda_t) non-decreasing in t, the weighted loss is a
   mixture of the ELBOs of noise-augmented data. With g(t) the diffusion loss density in t and
   G(t) = integral_t^1 g (the diffusion part of -ELBO of z_t ~ q(z_t | x), data noised up to t), integrating
   by parts gives

       L_w = integral_0^1 w(t) g(t) dt = w(0) G(0) + integral_0^1 w'(t) G(t) dt = w(1) E_{t ~ p_w}[G(t)],

   p_w = (w(0) delta_0 + w'(t) dt) / w(1), a probability exactly when w is non-decreasing in t. This is why the
   README may call the demo's sigmoid-weighted objective an ELBO.
2. VDM, Eq. 13 and App. E: one step of the discrete-time bound, KL(q(z_s | z_t, x) || p(z_s | z_t)) with
   p(z_s | z_t) = q(z_s | z_t, x_hat), is 0.5 (SNR_s - SNR_t) ||x - x_hat||^2.
"""
import jax
import jax.numpy as jnp
import numpy as np

from vdm import analytic, diffusion, schedules, time_sampling, weightings

DATA = analytic.GaussianData(dim=4, scale=0.5)
G0, G1 = -10.0, 6.0


def test_a_monotonic_weighted_loss_is_the_expected_elbo_of_noise_augmented_data():
    weighting = weightings.build("sigmoid", bias=2.0)
    assert weighting.monotonic
    t = np.linspace(0.0, 1.0, 20001)
    gamma = G0 + (G1 - G0) * t  # fixed_linear
    w = np.asarray(weighting(jnp.asarray(-gamma)), np.float64)
    dw = np.gradient(w, t)
    assert np.all(dw >= 0)
    # G(t) for the Bayes-optimal denoiser, in closed form: the diffusion loss of data noised up to gamma(t).
    g_tail = np.array([DATA.continuous_loss(g, G1) for g in gamma])
    mixture = w[0] * g_tail[0] + np.trapezoid(dw * g_tail, t)
    # The weighted loss itself, by the library's Monte Carlo estimator (4 standard errors) ...
    schedule = schedules.build("fixed_linear", gamma_min=G0, gamma_max=G1)
    f = DATA.sample(jax.random.PRNGKey(0), 8192)
    loss = np.asarray(diffusion.diffusion_loss(jax.random.PRNGKey(1), f, schedule, DATA.eps_fn,
                                               weighting=weighting, time_sampler="iid"), np.float64)
    assert abs(loss.mean() - mixture) < 4 * loss.std() / np.sqrt(loss.size), (loss.mean(), mixture)
    # ... and by quadrature over lambda (an independent closed form of the same integral).
    np.testing.assert_allclose(DATA.weighted_loss(lambda lam: np.asarray(weighting(jnp.asarray(lam)), np.float64),
                                                  -G1, -G0), mixture, rtol=1e-4)


def test_one_step_of_the_discrete_bound_is_the_kl_of_the_two_gaussians():
    num_steps, step = 10, 7  # t = 0.7, s = 0.6
    schedule = schedules.build("fixed_linear", gamma_min=G0, gamma_max=G1)
    rng = np.random.default_rng(0)
    f = jnp.asarray(rng.normal(size=(64, 6)) * 0.5, jnp.float32)
    seen = []

    def x_fn(z, gamma, cond=None):  # an arbitrary (imperfect) denoiser: x_hat = 0.3 z + 0.1
        seen.append(np.asarray(z, np.float64))
        return 0.3 * z + 0.1

    u = jnp.full((64,), (step - 0.5) / num_steps)
    levels = time_sampling.noise_levels(u, schedule, num_steps=num_steps)
    term, _ = diffusion.diffusion_terms(jax.random.PRNGKey(2), f, levels, x_fn, prediction="x")
    per_step = np.asarray(term, np.float64) / num_steps  # the bound is T times the mean over the T steps

    # The two Gaussians, in float64, from the process' own definitions.
    g_t, g_s = G0 + (G1 - G0) * step / num_steps, G0 + (G1 - G0) * (step - 1) / num_steps
    a_t, a_s = np.sqrt(1 / (1 + np.exp(g_t))), np.sqrt(1 / (1 + np.exp(g_s)))
    s2_t, s2_s = 1 / (1 + np.exp(-g_t)), 1 / (1 + np.exp(-g_s))
    a_ts = a_t / a_s
    s2_ts = s2_t - a_ts ** 2 * s2_s
    z_t, x, x_hat = seen[0], np.asarray(f, np.float64), 0.3 * seen[0] + 0.1
    mean = lambda x0: a_ts * s2_s / s2_t * z_t + a_s * s2_ts / s2_t * x0  # noqa: E731  (mean of q(z_s | z_t, x0))
    var = s2_ts * s2_s / s2_t
    kl = np.sum((mean(x) - mean(x_hat)) ** 2, -1) / (2 * var)
    np.testing.assert_allclose(per_step, kl, rtol=1e-4)
    snr = lambda g: np.exp(-g)  # noqa: E731
    np.testing.assert_allclose(kl, 0.5 * (snr(g_s) - snr(g_t)) * np.sum((x - x_hat) ** 2, -1), rtol=1e-9)
