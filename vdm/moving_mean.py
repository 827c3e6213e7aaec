"""DiffEnc (Nielsen et al., ICLR 2024): a learned time-dependent encoder of the mean, and its variational bound.

The forward process diffuses an encoding of the data instead of the data:

    q(z_t | x) = N(alpha_t m(x, gamma_t), sigma_t^2 I),   m(x, gamma) = f + r(f, gamma),

with f = encode(x) and the encoder's shift r(f, gamma) = sigma^2(gamma) y(f, gamma), y a network (DiffEnc's
"sigma^2" parameterisation: the encoder can move the mean most where the noise is large, and not at all at
gamma -> -inf; ``VDM`` builds it from a network of ``vdm.nets`` (``model.mean_encoder``), with the model's
``vdm.nets.NetworkContext`` less its conditioning: no classes, no latent, no gamma map. Its output starts at zero,
so an untrained encoder is the identity). Every function here takes the shift as ``offset_fn(f, gamma) -> r``.

The model's reverse step is DiffEnc's, p(z_s | z_t) = q(z_s | z_t, x = x_hat): the posterior of the forward
process with the data replaced by the model's prediction x_hat = (z_t - sigma_t eps_hat) / alpha_t, encoded at
both times (m_hat_s = x_hat + r(x_hat, gamma_s)). Its KL to the forward posterior, summed over T steps, tends to

    0.5 integral gamma'(t) SNR(t) || e_t - de_t / dgamma ||^2 dt,   e_t = m(x, gamma_t) - m(x_hat, gamma_t),

(the derivative taken at fixed x_hat), which is 0.5 integral gamma'(t) || eps_target - eps_model ||^2 dt with

    eps_target = eps + (alpha / sigma) dr(f, gamma) / dgamma              (the data's side), and
    eps_model  = eps_hat - (alpha / sigma) (r(x_hat, gamma) - dr(x_hat, gamma) / dgamma)   (``effective_eps``).

So the model *is* an eps-model, eps_model, and in the limit of small steps its reverse step is the ordinary
ancestral step of eps_model: every sampler and the probability-flow ODE take it unchanged (``VDM.eps`` returns
it). With r = 0 every term is VDM's, bit for bit op by op (compiled, to float32 rounding). The prior term is
KL(N(alpha_1 m_1, sigma_1^2) || N(0, I)), and the reconstruction term decodes z_0 ~ N(alpha_0 m_0, sigma_0^2) with
VDM's decoder; m_0 = f + sigma_0^2 y is within sigma_0^2 (2e-6 at gamma_0 = -13.3) of the data.

Supported: the continuous-time elbo with a schedule of one gamma per example (``check``).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vdm import diffusion, time_sampling


def check(*, elbo: bool, num_steps: int, elementwise: bool) -> None:
    """ValueError unless the objective is one this bound has: the continuous-time elbo, gamma per example."""
    if not elbo or num_steps:
        raise ValueError("a mean encoder (DiffEnc) has its bound in continuous time and trains the elbo only "
                         "(loss.weighting=elbo, loss.timesteps=0, eval.timesteps=0, no variance_schedule_grad)")
    if elementwise:
        raise ValueError("a mean encoder (DiffEnc) needs a schedule with one gamma per example")


def _shift_and_slope(offset_fn: Callable, f: jax.Array, gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(r(f, gamma), dr/dgamma) per element, gamma per example [B]."""
    return jax.jvp(lambda g: offset_fn(f, g), (gamma,), (jnp.ones_like(gamma),))


def effective_eps(offset_fn: Callable, eps_hat: jax.Array, z: jax.Array, gamma: jax.Array) -> jax.Array:
    """eps_model = eps_hat - (alpha / sigma) (r(x_hat) - dr(x_hat) / dgamma), x_hat = (z - sigma eps_hat) / alpha:
    the eps-prediction of a model with a mean encoder (the module docstring)."""
    gamma = jnp.broadcast_to(gamma, z.shape[:1]) if jnp.ndim(gamma) == 0 else gamma
    alpha, sigma = diffusion.alpha_sigma(diffusion.expand_to(gamma, z))
    x_hat = (z - sigma * eps_hat) / alpha
    r, dr = _shift_and_slope(offset_fn, x_hat, gamma)
    return eps_hat - alpha / sigma * (r - dr)


def bound(d: diffusion.Draw, x: jax.Array, gamma_fn: Callable, eps_fn: Callable, offset_fn: Callable, *,
          vocab_size: int = 256, logsnr_density=None, cond=None) -> diffusion.Bound:
    """DiffEnc's bound per example (``diffusion.Bound``, the elbo: ``weighted`` is ``diffusion``) for the draw ``d``.

    ``eps_fn(z, gamma, cond)`` is the model's eps-prediction eps_model (``effective_eps`` of its network's);
    ``offset_fn(f, gamma)`` the encoder's shift r. The same terms as ``diffusion.bound``, for the moving mean.
    """
    f = diffusion.encode(x, vocab_size)
    b = f.shape[0]
    gamma_0, gamma_1 = diffusion.schedule_endpoints(gamma_fn)
    # a per-example schedule's endpoints are scalars: the encoder takes one gamma per example
    prior = diffusion.prior_kl(f + offset_fn(f, jnp.broadcast_to(gamma_1, (b,))), gamma_1)
    reconstruction = diffusion.reconstruction_nll(d.reconstruction, x, gamma_0, vocab_size,
                                                  mean=f + offset_fn(f, jnp.broadcast_to(gamma_0, (b,))))
    levels = time_sampling.noise_levels(d.u, gamma_fn, logsnr_density=logsnr_density)
    gamma = levels.gamma
    r, dr = _shift_and_slope(offset_fn, f, gamma)
    eps = jax.random.normal(d.eps, f.shape, f.dtype)
    z = diffusion.diffuse(f + r, gamma, eps)
    alpha, sigma = diffusion.alpha_sigma(diffusion.expand_to(gamma, f))
    target = eps + alpha / sigma * dr
    term = diffusion.half_weighted_sum(levels.rate, jnp.square(target - eps_fn(z, gamma, cond)))
    return diffusion.Bound(prior=prior, reconstruction=reconstruction, diffusion=term, weighted=term,
                           logsnr=-gamma, gamma_0=gamma_0, gamma_1=gamma_1)
