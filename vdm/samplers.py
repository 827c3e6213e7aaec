"""Samplers: from z_1 ~ N(0, I) to z_0, then to data through the decoder.

Interface: ``sampler(rng, eps_fn, gamma_fn, z_1, cond=None, *, num_steps) -> z_0`` where
``eps_fn(z_t, gamma_t [B], cond)`` returns eps_hat and ``gamma_fn`` follows
``vdm.diffusion``; ``cond`` is passed to ``eps_fn`` untouched (classifier-free guidance
is part of the ``eps_fn`` the model hands in, so every sampler supports it).
``decode_samples`` turns z_0 into integers with the discretised decoder. A new sampler is
one function here plus its entry in ``SAMPLERS``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vdm import diffusion, registry


def ancestral(rng: jax.Array, eps_fn: Callable, gamma_fn: Callable, z_1: jax.Array, cond=None, *,
              num_steps: int) -> jax.Array:
    """The ancestral sampler of VDM (Kingma et al. 2021, App. A.4), T = ``num_steps``.

    For t = i / T and s = (i - 1) / T, i = T..1, sample z_s ~ p(z_s | z_t) = q(z_s | z_t, x = x_hat):

        c   = 1 - SNR(t) / SNR(s) = -expm1(gamma_s - gamma_t)
        z_s = (alpha_s / alpha_t) (z_t - sigma_t c eps_hat) + sqrt(sigma_s^2 c) eps.
    """
    batch = z_1.shape[0]

    def step(i, z_t):
        t = jnp.full((batch,), (num_steps - i) / num_steps)
        s = t - 1.0 / num_steps
        g_t, g_s = gamma_fn(t), gamma_fn(s)
        eps_hat = eps_fn(z_t, g_t, cond)
        g_t, g_s = diffusion.expand_to(g_t, z_t), diffusion.expand_to(g_s, z_t)
        c = -jnp.expm1(g_s - g_t)
        ratio = jnp.exp(0.5 * (jax.nn.log_sigmoid(-g_s) - jax.nn.log_sigmoid(-g_t)))  # alpha_s / alpha_t
        sigma_t = jnp.exp(0.5 * jax.nn.log_sigmoid(g_t))
        noise_std = jnp.sqrt(jax.nn.sigmoid(g_s) * c)
        eps = jax.random.normal(jax.random.fold_in(rng, i), z_t.shape, z_t.dtype)
        return ratio * (z_t - sigma_t * c * eps_hat) + noise_std * eps

    return jax.lax.fori_loop(0, num_steps, step, z_1)


SAMPLERS = {
    "ancestral": ancestral,
}


def build(name: str):
    """The sampler called ``name``."""
    return registry.lookup(SAMPLERS, name, "sampler")


def decode_samples(rng: jax.Array, z_0: jax.Array, gamma_0: jax.Array, vocab_size: int) -> jax.Array:
    """Draw x ~ p(x | z_0) from the discretised decoder; integers in {0..V-1}, int32."""
    log_probs = diffusion.decoder_log_probs(z_0, gamma_0, vocab_size)
    return jax.random.categorical(rng, log_probs, axis=-1).astype(jnp.int32)


def generate(rng: jax.Array, eps_fn: Callable, gamma_fn: Callable, shape: tuple, *, num_steps: int,
             vocab_size: int, sampler: str = "ancestral", cond=None) -> jax.Array:
    """Samples of the model: z_1 ~ N(0, I) of ``shape`` -> z_0 -> x, integers [B, ...]."""
    rng_z, rng_steps, rng_x = jax.random.split(rng, 3)
    z_0 = build(sampler)(rng_steps, eps_fn, gamma_fn, jax.random.normal(rng_z, shape), cond, num_steps=num_steps)
    gamma_0 = gamma_fn(jnp.zeros((shape[0],)))
    return decode_samples(rng_x, z_0, gamma_0, vocab_size)
