"""The diffusion process of VDM and its variational bound, as pure element-wise functions (no Flax state).

Kingma, Salimans, Poole, Ho, "Variational Diffusion Models", NeurIPS 2021,
arXiv 2107.00630; weighted losses from Kingma & Gao 2023, arXiv 2303.00848; noise levels that
differ per element as in MuLAN (Sahoo et al. 2024).

Conventions (stated once, here)
-------------------------------
- Data ``x`` are integers in {0, ..., V-1} (V = ``vocab_size``: 256 for 8-bit images,
  17 for scikit-learn's 8x8 digits). ``f = encode(x) = 2 (x + 0.5) / V - 1`` puts them at
  the bin centres in (-1, 1).
- ``gamma(t) = -log SNR(t)`` is increasing on t in [0, 1]; ``logsnr = lambda = -gamma``.
- ``alpha_t^2 = sigmoid(-gamma_t)``, ``sigma_t^2 = sigmoid(gamma_t)`` (variance
  preserving), ``z_t = alpha_t f + sigma_t eps`` with ``eps ~ N(0, I)``.
- **Shapes.** A noise level (gamma, its endpoints, its rate, a weight) is a scalar, one value per
  example ``[B]``, or one value per element ``[B or 1, *f.shape[1:]]``: every element of the data may
  have its own schedule. ``expand_to`` makes any of them broadcast against the data; every term
  below is a sum over elements, taken at the end (``sum_per_example``).
- The variational bound, in nats per example, is prior + reconstruction + diffusion:
    prior          sum_i KL(q(z_1,i | x) || N(0, 1))
    reconstruction -log p(x | z_0), the exact V-way discretised decoder, per element
    diffusion      continuous time (L_inf, Eq. 17): 0.5 sum_i gamma_i'(t) (eps_i - eps_hat_i)^2,
                   t ~ U(0, 1), gamma'(t) by ``jax.jvp`` of the schedule;
                   T steps (Eq. 13 in eps form): 0.5 T sum_i expm1(gamma_t,i - gamma_s,i) (eps_i - eps_hat_i)^2,
                   t = i / T, s = t - 1 / T, i uniform on {1, ..., T}.
  Both are 0.5 sum_i rate_i (eps_i - eps_hat_i)^2 with the **rate** d gamma / du of the noise level in
  the uniform variable u: gamma'(t), or T expm1(gamma_t - gamma_s), or 1 / p(lambda) when lambda is
  drawn from a density p (importance sampling).
- The **weight** is w(lambda) of Kingma & Gao and nothing else. The **weighted loss** is
  0.5 sum_i w(lambda_i) rate_i (eps_i - eps_hat_i)^2; w = 1 (``elbo``) makes it the diffusion term.
- bits/dim = nats / (num_dims ln 2) (``bits_per_dim``, the only place that converts).

A schedule is a callable ``gamma_fn(t [B]) -> gamma`` of shape ``[B]`` or ``[B, *f.shape[1:]]``; the bound also
takes its declared endpoints (``DeclaresEndpoints``: a ``vdm.schedules`` schedule, or ``FunctionSchedule(fn)``). A
denoiser is any callable ``eps_fn(z_t, gamma_t, cond) -> output`` receiving that same gamma, whose output
is an eps-, x-, v-, F- or o-prediction (``prediction=``), converted to eps in exactly one place,
``vdm.predictions.to_eps``. The noise levels and their rate are drawn by ``vdm.time_sampling.noise_levels``.
``cond`` is whatever the denoiser is conditioned on (``None``, or ``{"label": int [B]}``); the
functions here pass it through untouched.

The bound has one road: ``bound`` computes every term from one ``Draw``; ``vlb`` (a dict, for
notebooks and tests), ``diffusion_loss`` (the diffusion term alone) and the model's objective
(``vdm.objective``) all go through its parts.

Numerics: everything is written with ``log_sigmoid``, ``softplus`` and ``expm1`` so that
gamma anywhere in [-20, 20] is safe in float32.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from vdm import predictions, time_sampling, weightings

# ---- Data <-> bin centres; shapes (per example or per element); the forward process ----


def encode(x: jax.Array, vocab_size: int = 256) -> jax.Array:
    """Integers in {0..V-1} -> bin centres 2 (x + 0.5) / V - 1 in (-1, 1)."""
    return 2.0 * (jnp.asarray(x, jnp.float32) + 0.5) / vocab_size - 1.0


def decode(f: jax.Array, vocab_size: int = 256) -> jax.Array:
    """Inverse of ``encode``: nearest bin index of values in [-1, 1], as int32."""
    x = jnp.round((f + 1.0) * vocab_size / 2.0 - 0.5)
    return jnp.clip(x, 0, vocab_size - 1).astype(jnp.int32)


def expand_to(v: jax.Array, like: jax.Array) -> jax.Array:
    """A noise level shaped to broadcast against data ``like`` [B, ...]: a scalar stays one, per-example
    values [B] become [B, 1, ..., 1], per-element values [B or 1, ...] (as many axes as ``like``) stay."""
    v = jnp.asarray(v)
    return jnp.reshape(v, v.shape + (1,) * (like.ndim - v.ndim)) if v.ndim == 1 else v


def sum_per_example(v: jax.Array) -> jax.Array:
    """The sum over all but the first axis: [B, ...] -> [B]."""
    return jnp.sum(jnp.reshape(v, (v.shape[0], -1)), axis=-1)


def half_weighted_sum(c: jax.Array, squares: jax.Array) -> jax.Array:
    """0.5 sum_i c_i squares_i per example [B], for c per example [B] (taken out of the sum) or per element."""
    if jnp.ndim(c) <= 1:
        return 0.5 * c * sum_per_example(squares)
    return sum_per_example(0.5 * expand_to(c, squares) * squares)


def alpha_sigma(gamma: jax.Array) -> tuple[jax.Array, jax.Array]:
    """alpha = sqrt(sigmoid(-gamma)), sigma = sqrt(sigmoid(gamma)), via log-sigmoid."""
    return jnp.exp(0.5 * jax.nn.log_sigmoid(-gamma)), jnp.exp(0.5 * jax.nn.log_sigmoid(gamma))


def diffuse(f: jax.Array, gamma: jax.Array, eps: jax.Array) -> jax.Array:
    """z = alpha f + sigma eps, gamma per example [B] or per element (see ``expand_to``)."""
    alpha, sigma = alpha_sigma(expand_to(gamma, f))
    return alpha * f + sigma * eps


# ---- Prior and reconstruction terms -------------------------------------------------


def _endpoint(gamma, f: jax.Array) -> jax.Array:
    """An endpoint (scalar, per example [B] or per element) shaped to broadcast against ``f`` (a scalar per example)."""
    gamma = jnp.asarray(gamma, f.dtype)
    return expand_to(jnp.broadcast_to(gamma, f.shape[:1]) if gamma.ndim == 0 else gamma, f)


def prior_kl(f: jax.Array, gamma_1: jax.Array) -> jax.Array:
    """KL(q(z_1 | x) || N(0, I)) in nats per example [B]; ``gamma_1`` scalar, [B] or per element.

    Per element, with q = N(alpha f, sigma^2):
        0.5 (sigma^2 + alpha^2 f^2 - log sigma^2 - 1) = 0.5 (alpha^2 (f^2 - 1) + softplus(-gamma)),
    which avoids the cancellation in sigma^2 - 1 - log sigma^2 when gamma_1 is large.
    """
    g = _endpoint(gamma_1, f)
    alpha_sq = jax.nn.sigmoid(-g)
    return sum_per_example(0.5 * (alpha_sq * (f * f - 1.0) + jax.nn.softplus(-g)))


def decoder_logits(z_0: jax.Array, gamma_0: jax.Array, vocab_size: int = 256) -> jax.Array:
    """The decoder's unnormalised log p(x = k | z_0) for every k in {0..V-1}: shape z_0.shape + (V,).

    VDM's discretised decoder (Eq. 27-28): p(x | z_0) is proportional, per sub-pixel, to
    N(z_0 / alpha_0; encode(k), sigma_0^2 / alpha_0^2), normalised over the V values.
    ``z_0`` is [B, ...] and ``gamma_0`` a scalar, per example [B] or per element.
    """
    g = _endpoint(gamma_0, z_0)[..., None]
    alpha, _ = alpha_sigma(g)
    # (z_0 / alpha - c)^2 / (sigma / alpha)^2 = (z_0 / alpha - c)^2 exp(-gamma)
    return -0.5 * jnp.square(z_0[..., None] / alpha - encode(jnp.arange(vocab_size), vocab_size)) * jnp.exp(-g)


def decoder_log_probs(z_0: jax.Array, gamma_0: jax.Array, vocab_size: int = 256) -> jax.Array:
    """log p(x = k | z_0) for every k in {0..V-1}: shape z_0.shape + (V,) (see ``decoder_logits``)."""
    return jax.nn.log_softmax(decoder_logits(z_0, gamma_0, vocab_size), axis=-1)


def reconstruction_nll(rng: jax.Array, x: jax.Array, gamma_0: jax.Array, vocab_size: int = 256,
                       mean: jax.Array | None = None) -> jax.Array:
    """-log p(x | z_0) with z_0 ~ q(z_0 | x), in nats per example [B]; ``gamma_0`` scalar, [B] or per element.
    ``mean``: the mean of z_0 / alpha_0 if it is not encode(x) (a mean encoder, ``vdm.moving_mean``).

    log p(x | z_0) = logit(x) - log sum_k exp logit(k) (``decoder_logits``): the data value's logit
    is computed on its own, and the log-normaliser by ``_decoder_log_normaliser``, whose derivatives
    are per sub-pixel; neither builds a [B, ..., V] array in the backward pass. (Gathering from
    ``decoder_log_probs`` and differentiating took a third of the demo's train step on the CPU.)
    """
    f = encode(x, vocab_size)
    eps = jax.random.normal(rng, f.shape)
    gamma_0 = _endpoint(gamma_0, f)
    z_0 = diffuse(f if mean is None else mean, gamma_0, eps)
    g = jnp.broadcast_to(gamma_0, z_0.shape)
    alpha, _ = alpha_sigma(g)
    scaled, precision = z_0 / alpha, jnp.exp(-g)  # logit(k) = -0.5 precision (z_0 / alpha - centre_k)^2
    picked = -0.5 * precision * jnp.square(scaled - f)
    return -sum_per_example(picked - _decoder_log_normaliser(scaled, precision, vocab_size))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _decoder_log_normaliser(scaled: jax.Array, precision: jax.Array, vocab_size: int) -> jax.Array:
    """log sum_k exp(-0.5 precision (s - c_k)^2) over the V bin centres c_k, elementwise (s = z_0 / alpha).

    Shifted by its largest term, the nearest centre's, so it is stable for any precision. Its
    derivatives are expectations under the decoder's p(k): d/ds = -precision (s - E[c]),
    d/dprecision = -0.5 E[(s - c)^2], so a JVP (and the VJP, its transpose) costs one more pass
    over the V values in the forward pass and nothing of size V after it.
    """
    return _decoder_log_normaliser_and_moments(scaled, precision, vocab_size)[0]


def _decoder_log_normaliser_and_moments(scaled, precision, vocab_size):
    centres = encode(jnp.arange(vocab_size), vocab_size)
    nearest = encode(decode(scaled, vocab_size), vocab_size)
    top = -0.5 * precision * jnp.square(scaled - nearest)
    d = scaled[..., None] - centres
    w = jnp.exp(-0.5 * precision[..., None] * jnp.square(d) - top[..., None])
    total = jnp.sum(w, axis=-1)
    mean_centre = jnp.sum(w * centres, axis=-1) / total
    mean_square = jnp.sum(w * jnp.square(d), axis=-1) / total
    return top + jnp.log(total), mean_centre, mean_square


@_decoder_log_normaliser.defjvp
def _decoder_log_normaliser_jvp(vocab_size, primals, tangents):
    scaled, precision = primals
    dscaled, dprecision = tangents
    value, mean_centre, mean_square = _decoder_log_normaliser_and_moments(scaled, precision, vocab_size)
    return value, -precision * (scaled - mean_centre) * dscaled - 0.5 * mean_square * dprecision


# ---- The diffusion term -------------------------------------------------------------


def check_weighting(weighting, *, num_steps: int = 0) -> weightings.Weighting:
    """The weighting, when the bound's estimator can train it (T steps train the elbo only); else ValueError."""
    w = weightings.build(weighting)
    if num_steps and not w.is_elbo:
        raise ValueError(f"discrete time (num_steps={num_steps}) supports only the elbo weighting, not {w.name!r}")
    return w


def diffusion_terms(rng: jax.Array, f: jax.Array, levels: time_sampling.NoiseLevels, eps_fn: Callable, *,
                    weighting="elbo", prediction: str = "eps", cond=None) -> tuple[jax.Array, jax.Array]:
    """(diffusion term, weighted loss) per example [B] for eps ~ N(0, I) from ``rng``:
    0.5 sum_i rate_i (eps_i - eps_hat_i)^2 and 0.5 sum_i w(lambda_i) rate_i (eps_i - eps_hat_i)^2, from one
    network call. For the elbo weighting the two are the same array."""
    w = weightings.build(weighting)
    eps = jax.random.normal(rng, f.shape, f.dtype)
    z_t = diffuse(f, levels.gamma, eps)
    eps_hat = predictions.to_eps(prediction, eps_fn(z_t, levels.gamma, cond), z_t, levels.gamma)
    squares = jnp.square(eps - eps_hat)
    diffusion = half_weighted_sum(levels.rate, squares)
    if w.is_elbo:
        return diffusion, diffusion
    return diffusion, half_weighted_sum(w(-levels.gamma) * levels.rate, squares)


def diffusion_loss(rng: jax.Array, f: jax.Array, gamma_fn: Callable, eps_fn: Callable, *,
                   num_steps: int = 0, time_sampler="low_discrepancy", weighting="elbo",
                   prediction: str = "eps", logsnr_density=None, cond=None, return_aux: bool = False):
    """The diffusion term of the VLB (or its weighted version), in nats per example [B].

    Args:
      rng: PRNG key; split into one for the times and one for the noise.
      f: encoded data [B, ...] (any float data for analytic tests).
      gamma_fn: schedule, t [B] -> gamma [B] or [B, *f.shape[1:]], increasing in t; gamma'(t) from ``jax.jvp``.
      eps_fn: denoiser, (z_t [B, ...], gamma_t (as gamma_fn returns it), cond) -> its output [B, ...] (``prediction``).
      num_steps: 0 for continuous time (L_inf), T > 0 for the T-step loss L_T.
      time_sampler: name in ``time_sampling.TIME_SAMPLERS`` or a callable (rng, B) -> u.
      weighting: name in ``weightings.WEIGHTINGS`` or a ``Weighting``; "elbo" gives the VLB's term.
      prediction: what ``eps_fn`` predicts: a name in ``vdm.predictions.PREDICTIONS``.
      logsnr_density: a density over lambda (``time_sampling.GridDensity`` or
        ``AdaptiveDensity``) to importance-sample the noise level; the schedule's interior
        is then not used.
      cond: passed to ``eps_fn`` (``None``: unconditional).
      return_aux: also return {"logsnr", "log_p"} for density updates and diagnostics.

    With ``weighting="elbo"`` the mean over the data of the result is the diffusion term
    of the variational bound: Eq. 17 (continuous) or Eq. 13 (T steps) of Kingma et al.
    """
    check_weighting(weighting, num_steps=num_steps)
    rng_t, rng_eps = jax.random.split(rng)
    sampler = time_sampling.build(time_sampler) if isinstance(time_sampler, str) else time_sampler
    levels = time_sampling.noise_levels(sampler(rng_t, f.shape[0]), gamma_fn, num_steps=num_steps,
                                        logsnr_density=logsnr_density)
    _, loss = diffusion_terms(rng_eps, f, levels, eps_fn, weighting=weighting, prediction=prediction, cond=cond)
    if return_aux:
        log_p = None if logsnr_density is None else -jnp.log(levels.rate)
        return loss, {"logsnr": -levels.gamma, "log_p": log_p}
    return loss


# ---- The whole bound ----------------------------------------------------------------


@runtime_checkable
class DeclaresEndpoints(Protocol):
    """A schedule as the bound takes it, ``gamma = schedule(t)`` with the ``endpoints()`` it declares: a schedule of
    ``vdm.schedules`` (or one bound to a latent, ``schedules.bind``), or a plain function as ``FunctionSchedule``."""

    def __call__(self, t: jax.Array) -> jax.Array: ...

    def endpoints(self) -> tuple[jax.Array, jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class FunctionSchedule:
    """A plain function ``fn(t [B]) -> gamma`` as a schedule whose endpoints are its values at t = 0 and t = 1."""

    fn: Callable

    def __call__(self, t: jax.Array) -> jax.Array:
        return self.fn(t)

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        """(fn(0), fn(1)): scalars, or [1, ...] each for a function per element."""
        gamma = self.fn(jnp.array([0.0, 1.0]))
        return (gamma[0:1], gamma[1:2]) if gamma.ndim > 1 else (gamma[0], gamma[1])


def schedule_endpoints(schedule: DeclaresEndpoints) -> tuple[jax.Array, jax.Array]:
    """(gamma_0, gamma_1) that ``schedule`` declares: scalars, or per element [1, ...] for a per-element schedule.

    Declared, not evaluated: exact, and with no gradient to the schedule's interior (evaluating the
    interior at t = 0 and 1 cancels only up to rounding, and Adam would turn that rounding into full steps).

    Raises:
        TypeError: ``schedule`` declares no endpoints (wrap a plain function as ``FunctionSchedule(fn)``).
    """
    if not isinstance(schedule, DeclaresEndpoints):
        raise TypeError(f"the bound needs a schedule that declares endpoints(), not {schedule!r}: wrap a plain "
                        "t -> gamma function as vdm.diffusion.FunctionSchedule(fn)")
    return schedule.endpoints()


def bits_per_dim(nats: jax.Array, num_dims: int) -> jax.Array:
    """nats / (num_dims ln 2): the one place where nats become bits per dimension."""
    return nats * (1.0 / (num_dims * math.log(2.0)))


class Draw(NamedTuple):
    """The randomness of one estimate of the bound (``draw_for_bound``), and of the training step that takes it
    (``vdm.objective.draw_for_step`` also draws the network's keys, ``None`` here); ``bound`` reads the first three."""

    u: jax.Array  # [B] uniforms: the times t, or through a density the log-SNRs
    eps: jax.Array  # key: the diffusion noise
    reconstruction: jax.Array  # key: z_0 of the reconstruction term
    dropout: jax.Array | None = None  # key: the network's dropout
    labels: jax.Array | None = None  # key: label dropout
    latent: jax.Array | None = None  # key: the auxiliary latent c ~ q(c | x) of a MuLAN model


def draw_for_bound(rng: jax.Array, batch_size: int, time_sampler="low_discrepancy") -> Draw:
    """Split one key into the randomness of ``bound``: (diffusion: (t, eps), reconstruction).

    ``time_sampler``: a name in ``vdm.time_sampling.TIME_SAMPLERS`` or a sampler ``(key, B) -> u [B]``. Returns a
    ``Draw`` of ``u`` [B] and the keys ``eps`` and ``reconstruction`` (the network's keys ``None``).
    """
    rng_diffusion, rng_reconstruction = jax.random.split(rng)
    rng_t, rng_eps = jax.random.split(rng_diffusion)
    sampler = time_sampling.build(time_sampler) if isinstance(time_sampler, str) else time_sampler
    return Draw(u=sampler(rng_t, batch_size), eps=rng_eps, reconstruction=rng_reconstruction)


TERMS = ("prior", "reconstruction", "diffusion")  # the bound's terms, in the order they are reported


class Bound(NamedTuple):
    """One Monte Carlo estimate of the bound, per example [B], in nats.

    ``prior + reconstruction + diffusion`` estimates -log p(x) from above (``total``); the trained
    objective replaces the diffusion term by the ``weighted`` loss (``loss``; the same for the elbo).
    """

    prior: jax.Array
    reconstruction: jax.Array
    diffusion: jax.Array
    weighted: jax.Array
    logsnr: jax.Array  # lambda_t = -gamma_t: [B] or per element
    gamma_0: jax.Array  # the schedule's endpoints: scalars, or per element
    gamma_1: jax.Array
    latent: jax.Array | None = None  # of the prior: KL(q(c | x) || p(c)) of an auxiliary latent (``with_latent``)

    def with_latent(self, kl: jax.Array) -> "Bound":
        """The bound of a model with an auxiliary latent c (MuLAN, ``vdm.latent``): its KL [B] joins the prior
        term (the KL at the top of the hierarchy, beside z_1's) and is kept apart in ``latent`` for reports."""
        return self._replace(prior=self.prior + kl, latent=kl)

    @property
    def total(self) -> jax.Array:
        return self.prior + self.reconstruction + self.diffusion

    @property
    def loss(self) -> jax.Array:
        return self.prior + self.reconstruction + self.weighted

    def terms(self) -> dict[str, jax.Array]:
        """The bound's terms by name (``TERMS``): their sum is ``total``."""
        return {name: getattr(self, name) for name in TERMS}


def bound(d: Draw, x: jax.Array, gamma_fn: DeclaresEndpoints, eps_fn: Callable, *, vocab_size: int = 256,
          num_steps: int = 0, weighting="elbo", prediction: str = "eps", logsnr_density=None, cond=None,
          levels: time_sampling.NoiseLevels | None = None) -> Bound:
    """The variational bound -log p(x) <= prior + reconstruction + diffusion per example, and the weighted loss.

    ``x`` holds integers in {0..V-1}, shape [B, ...]; ``d`` its randomness (``draw_for_bound``); ``cond`` goes
    to ``eps_fn`` (with a label it is the conditional bound on -log p(x | y)). ``levels`` replaces the
    noise levels that ``d.u`` and the schedule would give (the schedule-variance gradient of
    ``vdm.objective`` differentiates through them).
    """
    check_weighting(weighting, num_steps=num_steps)
    f = encode(x, vocab_size)
    gamma_0, gamma_1 = schedule_endpoints(gamma_fn)
    prior = prior_kl(f, gamma_1)
    reconstruction = reconstruction_nll(d.reconstruction, x, gamma_0, vocab_size)
    if levels is None:
        levels = time_sampling.noise_levels(d.u, gamma_fn, num_steps=num_steps, logsnr_density=logsnr_density)
    diffusion, weighted = diffusion_terms(d.eps, f, levels, eps_fn, weighting=weighting, prediction=prediction,
                                          cond=cond)
    return Bound(prior=prior, reconstruction=reconstruction, diffusion=diffusion, weighted=weighted,
                 logsnr=-levels.gamma, gamma_0=gamma_0, gamma_1=gamma_1)


def vlb(rng: jax.Array, x: jax.Array, gamma_fn: DeclaresEndpoints, eps_fn: Callable, *, vocab_size: int = 256,
        num_steps: int = 0, time_sampler="low_discrepancy", prediction: str = "eps", cond=None) -> dict:
    """``bound`` for one key, as a dict of [B] arrays in nats: "prior", "reconstruction", "diffusion",
    "total", and "bpd" (total in bits per dim)."""
    b = bound(draw_for_bound(rng, x.shape[0], time_sampler), x, gamma_fn, eps_fn, vocab_size=vocab_size,
              num_steps=num_steps, prediction=prediction, cond=cond)
    return b.terms() | {"total": b.total, "bpd": bits_per_dim(b.total, math.prod(x.shape[1:]))}
