"""MuLAN's auxiliary latent (``vdm.latent``, the ``latent_polynomial`` schedule): its bound against the per-pixel
schedule's plus the KL, the KL against a Monte Carlo estimate, the schedule against ``per_pixel_polynomial``."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vdm import diffusion, evaluation, latent, schedules
from vdm import model as model_lib
from vdm import objective as objective_lib

SHAPE, VOCAB, K = (8, 8, 1), 17, 4


def _model(schedule, latent_size, seed=0):
    return model_lib.VDM(image_shape=SHAPE, vocab_size=VOCAB, schedule=schedule, gamma_min=-10.0, gamma_max=5.0,
                         network="mlp", network_kwargs={"hidden": 32, "depth": 1}, latent_size=latent_size,
                         latent_encoder_kwargs={"hidden": 16, "depth": 1}, rngs=nnx.Rngs(seed))


def _images(n=6, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (n,) + SHAPE), jnp.uint8)


def _x_independent_mulan_and_its_per_pixel_twin():
    """A MuLAN model whose encoder ignores its input (q(c | x) = N(mu, diag s^2), the same for every x) and whose
    latent reaches neither the schedule's coefficients nor the denoiser; and the per_pixel_polynomial model with
    the same coefficients, endpoints and network. Both perturbed away from their zero initialisations."""
    rng = np.random.default_rng(0)
    mulan, twin = _model("latent_polynomial", K), _model("per_pixel_polynomial", 0)
    n = math.prod(SHAPE)
    coefficients = rng.normal(size=(3, n)).astype(np.float32)
    s = mulan.schedule
    s.w2[...] = jnp.zeros_like(s.w2[...])  # the coefficients are b2's, whatever c
    s.b2[...] = jnp.asarray(coefficients.reshape(-1))
    for name, value in zip("abc", coefficients):
        getattr(twin.schedule, name)[...] = jnp.asarray(value.reshape(SHAPE))
    for sched in (s, twin.schedule):
        sched.endpoints.low[...] = jnp.asarray(rng.uniform(-10, -6, SHAPE), jnp.float32)
    twin.schedule.endpoints.low[...] = s.endpoints.low[...]
    enc = mulan.latent_encoder
    for layer in enc.layers:
        layer.kernel[...] = jnp.zeros_like(layer.kernel[...])  # c does not depend on x
    enc.out.bias[...] = jnp.asarray(rng.normal(size=2 * K) * 1.2, jnp.float32)
    enc.out.kernel[...] = jnp.asarray(rng.normal(size=enc.out.kernel.shape) * 0.3, jnp.float32)
    # the same network; MuLAN's latent projection at zero (the denoiser ignores c)
    perturbed = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.PRNGKey(3), v.shape),
                             nnx.state(twin.network, nnx.Param))
    nnx.update(twin.network, perturbed)
    nnx.update(mulan.network, perturbed)
    projection = mulan.network.conditioning.latent_projection.kernel
    projection[...] = jnp.zeros_like(projection[...])
    return mulan, twin


def test_bound_with_an_input_independent_latent_is_the_per_pixel_bound_plus_the_kl():
    """Same draws: every term of MuLAN's VLB (in nats) is the per-pixel schedule's, and the prior term gains exactly
    KL(q(c) || N(0, I)) (closed form), reported apart as ``bpd_latent``; the ODE's bound gains the same KL."""
    mulan, twin = _x_independent_mulan_and_its_per_pixel_twin()
    batch = {"image": _images(4)}
    mu, log_var = (np.asarray(v, np.float64) for v in mulan.latent_encoder(diffusion.encode(batch["image"], VOCAB)))
    np.testing.assert_array_equal(mu, np.broadcast_to(mu[0], mu.shape))  # the same q(c | x) for every x
    kl = float(latent.kl_to_prior(jnp.asarray(mu[:1]), jnp.asarray(log_var[:1]))[0])
    expected = 0.5 * float(np.sum(np.square(mu[0]) + np.exp(log_var[0]) - 1.0 - log_var[0]))  # float64, by hand
    assert kl == pytest.approx(expected, rel=1e-5) and kl > 1.0
    settings = {"ode": {"rtol": 1e-4, "atol": 1e-4}}
    a, b = (jax.jit(lambda rng, m=m: evaluation.both(m, batch, rng, settings))(jax.random.PRNGKey(5))
            for m in (mulan, twin))
    np.testing.assert_allclose(np.asarray(a.parts["bpd_latent"]), kl, rtol=1e-5)
    for name in ("bpd_reconstruction", "bpd_diffusion"):
        np.testing.assert_allclose(np.asarray(a.parts[name]), np.asarray(b.parts[name]), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(np.asarray(a.parts["bpd_prior"]), np.asarray(b.parts["bpd_prior"]) + kl, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a.bounds["bpd"]), np.asarray(b.bounds["bpd"]) + kl, rtol=1e-5)
    # The adaptive solves differ by rounding, which moves their steps: 0.05 nats at rtol 1e-4 here, against a KL
    # above 1 nat.
    np.testing.assert_allclose(np.asarray(a.bounds["bpd_ode"]) - np.asarray(b.bounds["bpd_ode"]), kl, atol=0.15)


def test_the_kl_term_matches_a_monte_carlo_estimate():
    """KL(q(c | x) || N(0, I)) in closed form against the mean of log q(c | x) - log p(c) over draws c ~ q
    (``latent.sample``), within four standard errors, per example of a trained-looking encoder."""
    rng = np.random.default_rng(1)
    mu = jnp.asarray(rng.normal(size=(3, K)), jnp.float32)
    log_var = jnp.asarray(rng.normal(size=(3, K)) * 0.8, jnp.float32)
    n = 20000
    c = jax.vmap(lambda key: latent.sample(key, mu, log_var))(jax.random.split(jax.random.PRNGKey(0), n))
    log_q = -0.5 * jnp.sum(jnp.square(c - mu) / jnp.exp(log_var) + log_var, axis=-1)
    log_p = -0.5 * jnp.sum(jnp.square(c), axis=-1)  # the 2 pi terms cancel
    samples = np.asarray(log_q - log_p, np.float64)
    estimate, se = samples.mean(0), samples.std(0, ddof=1) / math.sqrt(n)
    np.testing.assert_array_less(np.abs(estimate - np.asarray(latent.kl_to_prior(mu, log_var))), 4 * se)


def test_latent_polynomial_is_per_pixel_polynomial_with_the_coefficients_its_network_gives():
    """For each latent, the schedule equals per_pixel_polynomial with the a, b, c that its network computes
    (float64 NumPy forward pass of the network), and two latents give two different curves."""
    sched = schedules.build("latent_polynomial", gamma_min=-10.0, gamma_max=5.0, data_shape=SHAPE, latent_size=K,
                            hidden=8)
    for w in (sched.w2, sched.b2):
        w[...] = w[...] + 0.3 * jax.random.normal(jax.random.PRNGKey(2), w.shape)
    latents = np.random.default_rng(3).normal(size=(2, K))
    t = jnp.linspace(0.0, 1.0, 11)
    for c in latents:
        def swish(v):
            return v / (1.0 + np.exp(-v))
        p = {k: np.asarray(getattr(sched, k)[...], np.float64) for k in ("w0", "b0", "w1", "b1", "w2", "b2")}
        h = swish(swish(c @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"])
        a, b, cc = (h @ p["w2"] + p["b2"]).reshape((3,) + SHAPE)
        twin = schedules.build("per_pixel_polynomial", gamma_min=-10.0, gamma_max=5.0, data_shape=SHAPE)
        for name, value in zip("abc", (a, b, cc)):
            getattr(twin, name)[...] = jnp.asarray(value, jnp.float32)
        got = sched(t, jnp.broadcast_to(jnp.asarray(c, jnp.float32), (11, K)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(twin(t)), rtol=1e-4, atol=1e-4)
    both = sched(t[:2] * 0 + 0.5, jnp.asarray(latents, jnp.float32))
    assert float(jnp.max(jnp.abs(both[0] - both[1]))) > 0.1


def test_a_mulan_model_trains_samples_and_its_estimate_names_the_same_terms():
    """The gradient of a MuLAN model (away from its zero initialisation, where c reaches nothing yet) reaches the
    encoder, the schedule's network and the denoiser's latent projection; its terms are the usual three; sampling
    draws c from the prior and gives images in range."""
    m = _model("latent_polynomial", K)
    graphdef, params = nnx.split(m, nnx.Param)
    params = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.PRNGKey(4), v.shape), params)
    batch = {"image": _images(8)}
    obj = objective_lib.Objective()
    step = jax.jit(objective_lib.loss_and_grads, static_argnums=(0, 4))  # one compile: half the time of eager ops
    loss, grads, est = step(graphdef, params, batch, jax.random.PRNGKey(0), obj)
    assert sorted(est.nats) == sorted(objective_lib.TERMS) and np.isfinite(float(loss))
    g = nnx.to_pure_dict(grads) if not isinstance(grads, dict) else grads
    for path in (("latent_encoder", "out", "kernel"), ("schedule", "w2"),
                 ("network", "conditioning", "latent_projection", "kernel")):
        leaf = g
        for key in path:
            leaf = leaf[key]
        assert float(jnp.max(jnp.abs(leaf))) > 0, path
    samples = model_lib.generate(m, jax.random.PRNGKey(1), 3, num_steps=4)
    assert samples.images.shape == (3,) + SHAPE
    assert int(samples.images.min()) >= 0 and int(samples.images.max()) < VOCAB
