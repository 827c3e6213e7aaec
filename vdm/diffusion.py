"""The diffusion math of VDM, as pure functions (no Flax state).

Kingma, Salimans, Poole, Ho, "Variational Diffusion Models", NeurIPS 2021,
arXiv 2107.00630; weighted losses from Kingma & Gao 2023, arXiv 2303.00848.

Conventions (stated once, here)
-------------------------------
- Data ``x`` are integers in {0, ..., V-1} (V = ``vocab_size``: 256 for 8-bit images,
  17 for scikit-learn's 8x8 digits). ``f = encode(x) = 2 (x + 0.5) / V - 1`` puts them at
  the bin centres in (-1, 1).
- ``gamma(t) = -log SNR(t)`` is increasing on t in [0, 1]; ``logsnr = lambda = -gamma``.
- ``alpha_t^2 = sigmoid(-gamma_t)``, ``sigma_t^2 = sigmoid(gamma_t)`` (variance
  preserving), ``z_t = alpha_t f + sigma_t eps`` with ``eps ~ N(0, I)``.
- The variational bound, in nats per example, is prior + reconstruction + diffusion:
    prior          KL(q(z_1 | x) || N(0, I))
    reconstruction -log p(x | z_0), the exact V-way discretised decoder
    diffusion      continuous time (L_inf, Eq. 17): 0.5 gamma'(t) ||eps - eps_hat||^2,
                   t ~ U(0, 1), gamma'(t) by ``jax.jvp`` of the schedule;
                   T steps (Eq. 13 in eps form): 0.5 T expm1(gamma_t - gamma_s) ||eps - eps_hat||^2,
                   t = i / T, s = t - 1 / T, i uniform on {1, ..., T}.
- Weighted loss (Kingma & Gao): 0.5 w(lambda_t) (-dlambda/dt) ||eps - eps_hat||^2; w = 1 is
  the ELBO. With lambda drawn from a density p instead: 0.5 (w(lambda) / p(lambda)) ||...||^2.
- bits/dim = nats / (num_dims ln 2).

A schedule is any callable ``gamma_fn(t[B]) -> gamma[B]``; a denoiser is any callable
``eps_fn(z_t, gamma_t, cond) -> output`` whose output is an eps-, x- or v-prediction
(``prediction=``), converted to eps in exactly one place, ``to_eps``. ``cond`` is
whatever the denoiser is conditioned on (``None``, or ``{"label": int [B]}`` for the
class-conditional models of ``vdm.model``); the functions here pass it through untouched.

Numerics: everything is written with ``log_sigmoid``, ``softplus`` and ``expm1`` so that
gamma anywhere in [-20, 20] is safe in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from vdm import registry, time_sampling, weightings

# --------------------------------------------------------------------------------------
# Data <-> bin centres
# --------------------------------------------------------------------------------------


def encode(x: jax.Array, vocab_size: int = 256) -> jax.Array:
    """Integers in {0..V-1} -> bin centres 2 (x + 0.5) / V - 1 in (-1, 1)."""
    return 2.0 * (jnp.asarray(x, jnp.float32) + 0.5) / vocab_size - 1.0


def decode(f: jax.Array, vocab_size: int = 256) -> jax.Array:
    """Inverse of ``encode``: nearest bin index of values in [-1, 1], as int32."""
    x = jnp.round((f + 1.0) * vocab_size / 2.0 - 0.5)
    return jnp.clip(x, 0, vocab_size - 1).astype(jnp.int32)


# --------------------------------------------------------------------------------------
# The forward process
# --------------------------------------------------------------------------------------


def expand_to(v: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape per-example values [B] to broadcast against [B, ...]."""
    return jnp.reshape(v, v.shape + (1,) * (like.ndim - v.ndim))


def alpha_sigma(gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)), via log-sigmoid."""
    return jnp.exp(0.5 * jax.nn.log_sigmoid(-gamma)), jnp.exp(0.5 * jax.nn.log_sigmoid(gamma))


def diffuse(f: jax.Array, gamma: jax.Array, eps: jax.Array) -> jax.Array:
    """z = alpha f + sigma eps, with per-example gamma [B] broadcast over f [B, ...]."""
    alpha, sigma = alpha_sigma(expand_to(gamma, f))
    return alpha * f + sigma * eps


def _sum_per_example(v: jax.Array) -> jax.Array:
    return jnp.sum(jnp.reshape(v, (v.shape[0], -1)), axis=-1)


# --------------------------------------------------------------------------------------
# Prior and reconstruction terms
# --------------------------------------------------------------------------------------


def prior_kl(f: jax.Array, gamma_1: jax.Array) -> jax.Array:
    """KL(q(z_1 | x) || N(0, I)) in nats per example [B].

    Per dimension, with q = N(alpha f, sigma^2):
        0.5 (sigma^2 + alpha^2 f^2 - log sigma^2 - 1) = 0.5 (alpha^2 (f^2 - 1) + softplus(-gamma)),
    which avoids the cancellation in sigma^2 - 1 - log sigma^2 when gamma_1 is large.
    """
    gamma_1 = jnp.broadcast_to(jnp.asarray(gamma_1, f.dtype), f.shape[:1])
    g = expand_to(gamma_1, f)
    alpha_sq = jax.nn.sigmoid(-g)
    return _sum_per_example(0.5 * (alpha_sq * (f * f - 1.0) + jax.nn.softplus(-g)))


def decoder_logits(z_0: jax.Array, gamma_0: jax.Array, vocab_size: int = 256) -> jax.Array:
    """The decoder's unnormalised log p(x = k | z_0) for every k in {0..V-1}: shape z_0.shape + (V,).

    VDM's discretised decoder (Eq. 27-28): p(x | z_0) is proportional, per sub-pixel, to
    N(z_0 / alpha_0; encode(k), sigma_0^2 / alpha_0^2), normalised over the V values.
    ``z_0`` is [B, ...] and ``gamma_0`` per-example [B] or a scalar.
    """
    gamma_0 = jnp.broadcast_to(jnp.asarray(gamma_0, z_0.dtype), z_0.shape[:1])
    g = expand_to(gamma_0, z_0)[..., None]
    alpha, _ = alpha_sigma(g)
    # (z_0 / alpha - c)^2 / (sigma / alpha)^2 = (z_0 / alpha - c)^2 exp(-gamma)
    return -0.5 * jnp.square(z_0[..., None] / alpha - encode(jnp.arange(vocab_size), vocab_size)) * jnp.exp(-g)


def decoder_log_probs(z_0: jax.Array, gamma_0: jax.Array, vocab_size: int = 256) -> jax.Array:
    """log p(x = k | z_0) for every k in {0..V-1}: shape z_0.shape + (V,) (see ``decoder_logits``)."""
    return jax.nn.log_softmax(decoder_logits(z_0, gamma_0, vocab_size), axis=-1)


def reconstruction_nll(rng: jax.Array, x: jax.Array, gamma_0: jax.Array, vocab_size: int = 256) -> jax.Array:
    """-log p(x | z_0) with z_0 ~ q(z_0 | x), in nats per example [B].

    log p(x | z_0) = logit(x) - log sum_k exp logit(k) (``decoder_logits``): the data value's logit
    is computed on its own, and the log-normaliser by ``_decoder_log_normaliser``, whose derivatives
    are per sub-pixel; neither builds a [B, ..., V] array in the backward pass. (Gathering from
    ``decoder_log_probs`` and differentiating took a third of the demo's train step on the CPU.)
    """
    f = encode(x, vocab_size)
    eps = jax.random.normal(rng, f.shape)
    gamma_0 = jnp.broadcast_to(jnp.asarray(gamma_0, f.dtype), f.shape[:1])
    z_0 = diffuse(f, gamma_0, eps)
    g = jnp.broadcast_to(expand_to(gamma_0, z_0), z_0.shape)
    alpha, _ = alpha_sigma(g)
    u, precision = z_0 / alpha, jnp.exp(-g)  # logit(k) = -0.5 precision (u - centre_k)^2
    picked = -0.5 * precision * jnp.square(u - f)
    return -_sum_per_example(picked - _decoder_log_normaliser(u, precision, vocab_size))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _decoder_log_normaliser(u: jax.Array, precision: jax.Array, vocab_size: int) -> jax.Array:
    """log sum_k exp(-0.5 precision (u - c_k)^2) over the V bin centres c_k, elementwise.

    Shifted by its largest term, the nearest centre's, so it is stable for any precision. Its
    derivatives are expectations under the decoder's p(k): d/du = -precision (u - E[c]),
    d/dprecision = -0.5 E[(u - c)^2], so a JVP (and the VJP, its transpose) costs one more pass
    over the V values in the forward pass and nothing of size V after it.
    """
    return _decoder_log_normaliser_and_moments(u, precision, vocab_size)[0]


def _decoder_log_normaliser_and_moments(u, precision, vocab_size):
    centres = encode(jnp.arange(vocab_size), vocab_size)
    nearest = encode(decode(u, vocab_size), vocab_size)
    top = -0.5 * precision * jnp.square(u - nearest)
    d = u[..., None] - centres
    w = jnp.exp(-0.5 * precision[..., None] * jnp.square(d) - top[..., None])
    total = jnp.sum(w, axis=-1)
    mean_centre = jnp.sum(w * centres, axis=-1) / total
    mean_square = jnp.sum(w * jnp.square(d), axis=-1) / total
    return top + jnp.log(total), mean_centre, mean_square


@_decoder_log_normaliser.defjvp
def _decoder_log_normaliser_jvp(vocab_size, primals, tangents):
    u, precision = primals
    du, dprecision = tangents
    value, mean_centre, mean_square = _decoder_log_normaliser_and_moments(u, precision, vocab_size)
    return value, -precision * (u - mean_centre) * du - 0.5 * mean_square * dprecision


# --------------------------------------------------------------------------------------
# Network parameterisations: everything becomes an eps-prediction here, and only here
# --------------------------------------------------------------------------------------


def _eps_from_eps(out, z, gamma):
    return out


def _eps_from_x(out, z, gamma):
    """eps_hat = (z - alpha x_hat) / sigma."""
    alpha, sigma = alpha_sigma(expand_to(gamma, z))
    return (z - alpha * out) / sigma


def _eps_from_v(out, z, gamma):
    """v = alpha eps - sigma x (Salimans & Ho 2022), so eps_hat = sigma z + alpha v_hat."""
    alpha, sigma = alpha_sigma(expand_to(gamma, z))
    return sigma * z + alpha * out


PREDICTIONS = {
    "eps": _eps_from_eps,
    "x": _eps_from_x,
    "v": _eps_from_v,
}


def to_eps(prediction: str, out: jax.Array, z: jax.Array, gamma: jax.Array) -> jax.Array:
    """Convert a network output of kind ``prediction`` (eps, x or v) into eps_hat."""
    return registry.lookup(PREDICTIONS, prediction, "prediction")(out, z, gamma)


# --------------------------------------------------------------------------------------
# The diffusion term
# --------------------------------------------------------------------------------------


def noise_levels(u: jax.Array, gamma_fn: Callable, *, num_steps: int = 0, weighting="elbo",
                 logsnr_density=None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Map uniforms u [B] to (gamma_t, weight, log_p) for the per-example loss.

    The loss of example i is then 0.5 * weight_i * ||eps_i - eps_hat_i||^2, where

    - continuous time (``num_steps=0``): t = u, weight = w(lambda_t) gamma'(t);
    - T steps (``num_steps=T``): i = floor(u T) + 1, t = i / T, s = t - 1 / T,
      weight = T expm1(gamma_t - gamma_s) (ELBO only);
    - importance sampling (``logsnr_density`` given): lambda = F^{-1}(u),
      weight = w(lambda) / p(lambda); ``log_p`` is returned for density updates.
    """
    w = weightings.build(weighting)
    if logsnr_density is not None:
        if num_steps:
            raise ValueError("importance sampling of the noise level is for continuous time (num_steps=0)")
        logsnr, log_p = logsnr_density.sample(u)
        return -logsnr, w(logsnr) * jnp.exp(-log_p), log_p
    if num_steps:
        if not w.is_elbo:
            raise ValueError(f"discrete time (num_steps={num_steps}) supports only the elbo weighting, not {w.name!r}")
        t = (jnp.floor(u * num_steps) + 1.0) / num_steps
        t = jnp.minimum(t, 1.0)
        gamma_t = gamma_fn(t)
        gamma_s = gamma_fn(t - 1.0 / num_steps)
        return gamma_t, num_steps * jnp.expm1(gamma_t - gamma_s), None
    gamma_t, dgamma_dt = jax.jvp(gamma_fn, (u,), (jnp.ones_like(u),))
    return gamma_t, w(-gamma_t) * dgamma_dt, None


def denoising_loss(rng: jax.Array, f: jax.Array, gamma_t: jax.Array, weight: jax.Array,
                   eps_fn: Callable, *, prediction: str = "eps", cond=None) -> jax.Array:
    """0.5 * weight * ||eps - eps_hat(z_t, gamma_t, cond)||^2 per example [B], eps ~ N(0, I) from rng."""
    eps = jax.random.normal(rng, f.shape, f.dtype)
    z_t = diffuse(f, gamma_t, eps)
    eps_hat = to_eps(prediction, eps_fn(z_t, gamma_t, cond), z_t, gamma_t)
    return 0.5 * weight * _sum_per_example(jnp.square(eps - eps_hat))


def diffusion_loss(rng: jax.Array, f: jax.Array, gamma_fn: Callable, eps_fn: Callable, *,
                   num_steps: int = 0, time_sampler="low_discrepancy", weighting="elbo",
                   prediction: str = "eps", logsnr_density=None, cond=None, return_aux: bool = False):
    """The diffusion term of the VLB (or its weighted version), in nats per example [B].

    Args:
      rng: PRNG key; split into one for the times and one for the noise.
      f: encoded data [B, ...] (any float data for analytic tests).
      gamma_fn: schedule, t [B] -> gamma [B], increasing; gamma'(t) comes from ``jax.jvp``.
      eps_fn: denoiser, (z_t [B, ...], gamma_t [B], cond) -> eps/x/v prediction [B, ...].
      num_steps: 0 for continuous time (L_inf), T > 0 for the T-step loss L_T.
      time_sampler: name in ``time_sampling.TIME_SAMPLERS`` or a callable (rng, B) -> u.
      weighting: name in ``weightings.WEIGHTINGS`` or a ``Weighting``; "elbo" gives the VLB.
      prediction: what ``eps_fn`` predicts: "eps", "x" or "v".
      logsnr_density: a density over lambda (``time_sampling.GridDensity`` or
        ``AdaptiveDensity``) to importance-sample the noise level; the schedule's interior
        is then not used.
      cond: passed to ``eps_fn`` (``None``: unconditional).
      return_aux: also return {"logsnr", "log_p"} for density updates and diagnostics.

    With ``weighting="elbo"`` the mean over the data of the result is the diffusion term
    of the variational bound: Eq. 17 (continuous) or Eq. 13 (T steps) of Kingma et al.
    """
    batch = f.shape[0]
    rng_t, rng_eps = jax.random.split(rng)
    sampler = time_sampling.build(time_sampler) if isinstance(time_sampler, str) else time_sampler
    u = sampler(rng_t, batch)
    gamma_t, weight, log_p = noise_levels(u, gamma_fn, num_steps=num_steps, weighting=weighting,
                                          logsnr_density=logsnr_density)
    loss = denoising_loss(rng_eps, f, gamma_t, weight, eps_fn, prediction=prediction, cond=cond)
    if return_aux:
        return loss, {"logsnr": -gamma_t, "log_p": log_p}
    return loss


# --------------------------------------------------------------------------------------
# The whole bound
# --------------------------------------------------------------------------------------


def schedule_endpoints(gamma_fn: Callable) -> tuple[jax.Array, jax.Array]:
    """(gamma_0, gamma_1) of a schedule.

    Schedules from ``vdm.schedules`` declare their endpoints (``gamma_fn.endpoints()``):
    exact, and with no gradient to the schedule's interior (evaluating the interior at
    t = 0 and 1 cancels only up to rounding, and Adam would turn that rounding into full
    steps). Any other callable is evaluated at t = 0 and t = 1.
    """
    endpoints = getattr(gamma_fn, "endpoints", None)
    if callable(endpoints):
        return endpoints()
    gamma = gamma_fn(jnp.array([0.0, 1.0]))
    return gamma[0], gamma[1]


def bits_per_dim(nats: jax.Array, num_dims: int) -> jax.Array:
    """nats / (num_dims ln 2): the one place where nats become bits per dimension."""
    return nats * (1.0 / (num_dims * math.log(2.0)))


def vlb(rng: jax.Array, x: jax.Array, gamma_fn: Callable, eps_fn: Callable, *, vocab_size: int = 256,
        num_steps: int = 0, time_sampler="low_discrepancy", prediction: str = "eps", cond=None) -> dict:
    """The variational bound -log p(x) <= prior + reconstruction + diffusion, per example.

    ``x`` holds integers in {0..V-1}, shape [B, ...]; ``cond`` goes to ``eps_fn`` (with a
    label it is the conditional bound on -log p(x | y)). Returns a dict of [B] arrays in nats:
    "prior", "reconstruction", "diffusion", "total", and "bpd" (total in bits per dim).
    """
    f = encode(x, vocab_size)
    rng_diffusion, rng_reconstruction = jax.random.split(rng)
    gamma_0, gamma_1 = schedule_endpoints(gamma_fn)
    terms = {
        "prior": prior_kl(f, gamma_1),
        "reconstruction": reconstruction_nll(rng_reconstruction, x, gamma_0, vocab_size),
        "diffusion": diffusion_loss(rng_diffusion, f, gamma_fn, eps_fn, num_steps=num_steps,
                                    time_sampler=time_sampler, prediction=prediction, cond=cond),
    }
    terms["total"] = terms["prior"] + terms["reconstruction"] + terms["diffusion"]
    terms["bpd"] = bits_per_dim(terms["total"], math.prod(x.shape[1:]))
    return terms


# --------------------------------------------------------------------------------------
# The variance-minimising schedule gradient (Kingma et al. 2021, App. I.2)
# --------------------------------------------------------------------------------------


def value_and_grad_with_schedule_variance(per_example_fn: Callable, shape_fn: Callable,
                                          interior, other, t: jax.Array):
    """Gradients for training a schedule's interior to minimise the estimator's variance.

    In continuous time the VLB depends on the schedule only through its endpoints
    (Kingma et al. 2021, Sec. 5.1), so the VLB gradient on the *interior* of the
    schedule is zero in expectation and pure noise in practice. App. I.2 instead trains
    the interior to minimise the variance of the Monte Carlo estimate, i.e. E[L_hat^2],
    whose gradient is E[2 L_hat dL_hat/d eta]. The endpoints and every other parameter
    keep the ordinary VLB gradient.

    The schedule is gamma(t) = gamma_min + (gamma_max - gamma_min) shape(t) with
    shape(0) = 0, shape(1) = 1, and ``interior`` (eta) the parameters of ``shape``. One
    forward and one backward pass of the model give d mean(L)/d(other, s, ds) at
    s = shape(t), ds = shape'(t); the cotangents on (s, ds) are scaled per example by
    2 L_hat_i before a (cheap) backward pass through ``shape`` alone.

    Args:
      per_example_fn: (other, s [B], ds [B]) -> (total [B], diffusion [B], aux): the
        per-example objective and its diffusion term, computed with
        gamma_t = gamma_min + (gamma_max - gamma_min) s and
        gamma'(t) = (gamma_max - gamma_min) ds.
      shape_fn: (interior, t [B]) -> shape(t) [B].
      interior, other: parameter pytrees.
      t: the batch's times [B].

    Returns:
      (mean total, aux), grads of mean(total) w.r.t. ``other``, and grads of
      mean(diffusion^2) w.r.t. ``interior``.
    """
    def shape_and_slope(params):
        return jax.jvp(lambda tt: shape_fn(params, tt), (t,), (jnp.ones_like(t),))

    (s, ds), shape_vjp = jax.vjp(shape_and_slope, interior)

    def objective(other, s, ds):
        total, diffusion, aux = per_example_fn(other, s, ds)
        return jnp.mean(total), (diffusion, aux)

    (value, (diffusion, aux)), (g_other, g_s, g_ds) = jax.value_and_grad(
        objective, argnums=(0, 1, 2), has_aux=True)(other, s, ds)
    scale = 2.0 * jax.lax.stop_gradient(diffusion)
    (g_interior,) = shape_vjp((scale * g_s, scale * g_ds))
    return (value, aux), g_other, g_interior
