"""MuLAN's auxiliary latent c (Sahoo et al. 2024): the encoder q(c | x), the prior p(c) = N(0, I) and their KL.

A model with ``latent_size > 0`` draws c ~ q(c | x) = N(mu(x), diag exp(log_var(x))) for every example; its
denoiser is conditioned on c (``cond["latent"]``) and so, for the ``latent_polynomial`` schedule, is the noise
schedule gamma(c, t). The bound on -log p(x) gains the KL of the latent:

    -log p(x) <= KL(q(c | x) || N(0, I)) + E_{q(c | x)} [ -log p(x | c) ],

and -log p(x | c) is bounded by the VLB (or by the probability-flow ODE's dequantised bound) of the diffusion
given c. One c is drawn per example per estimate: the VLB and the ODE's bound stay unbiased upper bounds.
Generation draws c from the prior.

The encoder is a residual-free MLP on the flattened data (MuLAN's own is a small U-Net without time input):
``depth`` swish layers of width ``hidden``, then a linear map to (mu, log_var) that starts at zero, so that
at initialisation q(c | x) = N(0, I) for every x, the KL is 0 and c carries nothing of x.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import options, registry


# The latent's draws come from fold_in(key, STREAM) of the key that draws everything else (a training step's, a
# sampler's): folded in, not split, so that every other draw is the same as for a model without a latent.
STREAM = 0x1A7E


# name (config.model.latent_encoder) -> the encoder's class; a new one is a class decorated with
# @LATENT_ENCODERS.register(name)
LATENT_ENCODERS: registry.Registry = registry.Registry("latent encoder")


@LATENT_ENCODERS.register("mlp")
class LatentEncoder(nnx.Module):
    """q(c | x): encoded data f [B, *data_shape] -> (mu, log_var), each [B, latent_size]."""

    def __init__(self, *, data_shape: tuple, latent_size: int, hidden: int = 256, depth: int = 2, rngs: nnx.Rngs):
        options.positive_int("latent_size", latent_size)
        options.positive_int("hidden", hidden)
        options.positive_int("depth", depth)
        widths = [math.prod(data_shape)] + [hidden] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.out = nnx.Linear(hidden, 2 * latent_size, kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, f: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = f.reshape(f.shape[0], -1)
        for layer in self.layers:
            h = jax.nn.swish(layer(h))
        mu, log_var = jnp.split(self.out(h), 2, axis=-1)
        return mu, log_var


def sample(rng: jax.Array, mu: jax.Array, log_var: jax.Array) -> jax.Array:
    """c = mu + exp(log_var / 2) e, e ~ N(0, I): a draw of q(c | x), differentiable in mu and log_var."""
    return mu + jnp.exp(0.5 * log_var) * jax.random.normal(rng, mu.shape, mu.dtype)


def kl_to_prior(mu: jax.Array, log_var: jax.Array) -> jax.Array:
    """KL(N(mu, exp(log_var)) || N(0, I)) in nats per example [B]: 0.5 sum(mu^2 + exp(log_var) - log_var - 1)."""
    return 0.5 * jnp.sum(jnp.square(mu) + jnp.expm1(log_var) - log_var, axis=-1)


def prior_sample(rng: jax.Array, batch_size: int, latent_size: int) -> jax.Array:
    """c ~ p(c) = N(0, I), [B, latent_size]: the latents of generated samples."""
    return jax.random.normal(rng, (batch_size, latent_size))


def build(name: str, **kwargs) -> nnx.Module:
    """The encoder q(c | x) called ``name`` (``LATENT_ENCODERS``), built with ``kwargs``."""
    return registry.lookup(LATENT_ENCODERS, name, "latent encoder")(**kwargs)
