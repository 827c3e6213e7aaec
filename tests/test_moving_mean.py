"""DiffEnc's mean encoder (``vdm.moving_mean``): VDM's terms at the identity, and the diffusion term against the KL of
one small reverse step computed from the two Gaussians' means (a finite difference of the moving mean)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdm import diffusion, moving_mean, predictions
from vdm import model as model_lib
from vdm import objective as objective_lib

SHAPE, VOCAB = (8, 8, 1), 17


def _model(mean_encoder=""):
    return model_lib.VDM(image_shape=SHAPE, vocab_size=VOCAB, schedule="monotone_net", schedule_kwargs={"hidden": 16},
                         gamma_min=-10.0, gamma_max=5.0, network="mlp", network_kwargs={"hidden": 32, "depth": 1},
                         mean_encoder=mean_encoder, mean_encoder_kwargs={"hidden": 16, "depth": 1},
                         rngs=nnx.Rngs(0))


def _perturb(module, seed, scale=0.1):
    state = nnx.state(module, nnx.Param)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(state))))
    nnx.update(module, jax.tree.map(lambda v: v + scale * jax.random.normal(next(keys), v.shape), state))


def _images(n=6):
    return jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (n,) + SHAPE), jnp.uint8)


def test_the_identity_encoder_gives_exactly_vdms_terms():
    """An untrained encoder (its network's output is zero) is the identity: every term of the bound, the trained
    loss and the model's eps-prediction are VDM's for the same network and draws: bit for bit op by op (measured),
    to float32 rounding compiled, where XLA fuses the two programs differently (compiled here: half the time)."""
    diffenc, vdm = _model("mlp"), _model()
    _perturb(vdm.network, 1)
    nnx.update(diffenc.network, nnx.state(vdm.network, nnx.Param))
    _perturb(diffenc.schedule, 2)
    nnx.update(vdm.schedule, nnx.state(diffenc.schedule, nnx.Param))
    batch, obj = {"image": _images()}, objective_lib.Objective()
    d = objective_lib.draw_for_step(jax.random.PRNGKey(0), 6, obj)
    a, b = (jax.jit(lambda d, m=m: objective_lib.estimate(m, batch, d, obj))(d) for m in (diffenc, vdm))
    for name in ("prior", "reconstruction", "diffusion", "weighted"):
        # atol: the reconstruction term is a sum of log-probabilities near 0 whose parts carry exp(-gamma_0) = 2e4
        np.testing.assert_allclose(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), rtol=1e-6, atol=1e-4,
                                   err_msg=name)
    z, g = jax.random.normal(jax.random.PRNGKey(1), (6,) + SHAPE), jnp.linspace(-8.0, 4.0, 6)
    eps = [jax.jit(lambda z, g, m=m: m.eps(z, g))(z, g) for m in (diffenc, vdm)]
    np.testing.assert_allclose(np.asarray(eps[0]), np.asarray(eps[1]), rtol=1e-6, atol=1e-7)


def test_the_diffusion_term_is_the_limit_of_the_reverse_steps_kl():
    """With a learned (perturbed) encoder: KL(q(z_s | z_t, x) || p(z_s | z_t)) / (t - s), from the two Gaussians'
    means (the forward posterior of the moving mean, and DiffEnc's p = q(. | x = x_hat) with the prediction encoded
    at s and at t), tends to the library's diffusion integrand at t; Richardson's extrapolation of two steps
    removes the O(t - s) error."""
    m = _model("mlp")
    for part in (m.network, m.schedule, m.mean_encoder):
        _perturb(part, 3)
    x = _images(4)
    f = diffusion.encode(x, VOCAB)
    t = jnp.array([0.2, 0.45, 0.6, 0.85])
    key = jax.random.PRNGKey(7)
    d = diffusion.Draw(u=t, eps=key, reconstruction=key)
    library = jax.jit(lambda d: moving_mean.bound(d, x, m.schedule, lambda z, g, c: m.eps(z, g), m.mean_offset,
                                                  vocab_size=VOCAB))(d)
    eps = jax.random.normal(key, f.shape, f.dtype)

    def per_unit_time_kl(delta):
        g_t, g_s = m.schedule(t), m.schedule(t - delta)
        a_t, s_t = (diffusion.expand_to(v, f) for v in diffusion.alpha_sigma(g_t))
        a_s, s_s = (diffusion.expand_to(v, f) for v in diffusion.alpha_sigma(g_s))
        mean_t, mean_s = f + m.mean_offset(f, g_t), f + m.mean_offset(f, g_s)
        z_t = a_t * mean_t + s_t * eps
        x_hat = (z_t - s_t * predictions.to_eps("eps", m.denoiser()(z_t, g_t), z_t, g_t)) / a_t
        hat_t, hat_s = x_hat + m.mean_offset(x_hat, g_t), x_hat + m.mean_offset(x_hat, g_s)
        ratio = diffusion.expand_to(jnp.exp(g_s - g_t), f)  # SNR_t / SNR_s
        gap = a_s * ((mean_s - hat_s) - ratio * (mean_t - hat_t))  # mu_q - mu_p
        var = s_s ** 2 * (1.0 - ratio)
        return diffusion.sum_per_example(jnp.square(gap) / (2.0 * var)) / delta

    # steps this small: the monotone network's curvature makes 1e-3 steps 20% off near t = 1; float32 holds here
    coarse, fine = (jax.jit(per_unit_time_kl)(delta) for delta in (2e-4, 1e-4))
    np.testing.assert_allclose(np.asarray(2 * fine - coarse), np.asarray(library.diffusion), rtol=5e-3)
    # and the step's KL is not VDM's: the moving mean contributes
    vdm_like = moving_mean.bound(d, x, m.schedule, lambda z, g, c: m.denoiser()(z, g), lambda f, g: 0.0 * f,
                                 vocab_size=VOCAB)
    assert np.max(np.abs(np.asarray(vdm_like.diffusion) / np.asarray(library.diffusion) - 1)) > 0.1


def test_what_a_mean_encoder_cannot_train_is_one_line_naming_the_field():
    """The moving mean's bound is the continuous-time elbo with one gamma per example: every other objective, and an
    evaluated bound of T steps, is refused by ``configlib.validate`` (before any compile) in one line."""
    from vdm import configlib, configs

    cases = {"loss.timesteps": ({"loss.timesteps": 10}, "config.model.mean_encoder='mlp'"),
             "eval.timesteps": ({"eval.timesteps": 10}, "config.eval.timesteps=10"),
             "weighting": ({"loss.weighting": "sigmoid"}, "config.model.mean_encoder='mlp'"),
             "per element": ({"model.schedule": "per_pixel_polynomial"}, "config.model.mean_encoder='mlp'"),
             "second order": ({"model.prediction": "v", "loss.second_order_weight": 0.1},
                              "config.loss.second_order_weight=0.1")}
    for name, (overrides, field) in cases.items():
        config, _ = configlib.override(configs.get("test"), {"model.mean_encoder": "mlp", "loss.weighting": "elbo"}
                                       | overrides)
        try:
            configlib.validate(config)
        except configlib.ConfigError as e:
            assert str(e).startswith(field + ": ") and "\n" not in str(e), (name, str(e))
        else:
            raise AssertionError(f"{name}: accepted")
    config, _ = configlib.override(configs.get("test"), {"model.mean_encoder": "mlp", "loss.weighting": "elbo"})
    configlib.validate(config)
