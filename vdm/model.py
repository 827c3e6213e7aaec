"""The VDM model: a noise schedule and a score network, and the objectives that use them.

``VDM`` is a Flax NNX module holding exactly two parts, ``schedule`` (t -> gamma) and
``score`` (z_t, gamma_t -> network output), plus static facts about the data. The losses
are functions of the model, so a notebook can call them without any trainer:

    model = VDM.from_config(config, image_shape=(28, 28, 1), vocab_size=256, rngs=nnx.Rngs(0))
    loss, metrics = training_loss(model, rng, x, LossSettings.from_config(config))
    terms = evaluation_terms(model, rng, x, num_steps=0)          # the true VLB, per example
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import diffusion, nets, samplers, schedules, time_sampling, weightings

VECTOR_NETWORKS = ("mlp",)  # networks that take flat vectors [B, D] rather than images


class VDM(nnx.Module):
    """Schedule + score network for data of shape ``image_shape`` with ``vocab_size`` values."""

    def __init__(self, *, image_shape: tuple, vocab_size: int, schedule: str, gamma_min: float,
                 gamma_max: float, network: str, prediction: str = "eps", schedule_kwargs: dict | None = None,
                 network_kwargs: dict | None = None, rngs: nnx.Rngs):
        self.image_shape = tuple(int(d) for d in image_shape)
        self.vocab_size = int(vocab_size)
        self.prediction = prediction
        self.flatten = network in VECTOR_NETWORKS
        self.schedule = schedules.build(schedule, gamma_min=gamma_min, gamma_max=gamma_max, rngs=rngs,
                                        **(schedule_kwargs or {}))
        in_channels = math.prod(self.image_shape) if self.flatten else self.image_shape[-1]
        self.score = nets.build(network, in_channels=in_channels, gamma_min=gamma_min, gamma_max=gamma_max,
                                rngs=rngs, **(network_kwargs or {}))

    @classmethod
    def from_config(cls, config, *, image_shape: tuple, vocab_size: int, rngs: nnx.Rngs) -> "VDM":
        m = config.model
        return cls(image_shape=image_shape, vocab_size=vocab_size, schedule=m.schedule, gamma_min=m.gamma_min,
                   gamma_max=m.gamma_max, network=m.network, prediction=m.prediction,
                   schedule_kwargs=dict(m.schedule_kwargs), network_kwargs=dict(m.network_kwargs), rngs=rngs)

    def eps_fn(self, dropout_rng: jax.Array | None = None):
        """The denoiser as ``(z_t, gamma_t) -> network output`` (dropout iff a key is given)."""

        def fn(z, gamma):
            shape = z.shape
            if self.flatten:
                z = z.reshape(shape[0], -1)
            return self.score(z, gamma, dropout_rng=dropout_rng).reshape(shape)

        return fn


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """What the training objective is: the config's ``loss`` section, resolved."""

    weighting: weightings.Weighting
    num_steps: int = 0  # 0: continuous time
    time_sampler: str = "low_discrepancy"
    importance_sampling: str = ""  # "", "weighting" or "adaptive"
    variance_schedule_grad: bool = False

    @classmethod
    def from_config(cls, config) -> "LossSettings":
        c = config.loss
        return cls(weighting=weightings.build(c.weighting, **dict(c.weighting_kwargs)), num_steps=int(c.num_steps),
                   time_sampler=c.time_sampler, importance_sampling=c.importance_sampling,
                   variance_schedule_grad=bool(c.variance_schedule_grad))


def _bpd_scale(model: VDM) -> float:
    return 1.0 / (math.prod(model.image_shape) * math.log(2.0))


def _split_rng(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(diffusion, reconstruction, dropout) keys of one training step."""
    rng_diffusion, rng_reconstruction, rng_dropout = jax.random.split(rng, 3)
    return rng_diffusion, rng_reconstruction, rng_dropout


def training_times(rng: jax.Array, batch_size: int, settings: LossSettings) -> jax.Array:
    """The uniforms u (= t) that ``training_loss(model, rng, ...)`` draws: its times, in advance.

    ``diffusion.diffusion_loss`` splits its key into (times, noise); this reproduces the
    first half, for the variance-minimising schedule gradient, which needs t before the loss.
    """
    rng_t, _ = jax.random.split(_split_rng(rng)[0])
    return time_sampling.build(settings.time_sampler)(rng_t, batch_size)


def training_loss(model: VDM, rng: jax.Array, x: jax.Array, settings: LossSettings, density=None,
                  levels=None):
    """The training objective in bits/dim and its metrics.

    Objective per example: prior + reconstruction + the (weighted) diffusion term. With
    ``weighting="elbo"`` and no importance sampling this is the VLB itself. The metrics
    always include an unbiased estimate of the VLB from the same samples (the diffusion
    term divided by w(lambda)), so bpd is reported whatever is trained.

    ``levels=(s, ds)`` replaces the schedule's interior by its values shape(t), shape'(t)
    at ``t = training_times(rng, ...)``, for ``diffusion.value_and_grad_with_schedule_variance``.

    Returns (mean loss, metrics); metrics hold per-batch means plus the per-example
    "per_example_loss" and "diffusion_nats" (for the variance gradient), "logsnr" and,
    with a density, "integrand" (for adaptive density updates).
    """
    f = diffusion.encode(x, model.vocab_size)
    rng_diffusion, rng_reconstruction, rng_dropout = _split_rng(rng)
    gamma_0, gamma_1 = diffusion.schedule_endpoints(model.schedule)
    prior = diffusion.prior_kl(f, gamma_1)
    reconstruction = diffusion.reconstruction_nll(rng_reconstruction, x, gamma_0, model.vocab_size)
    eps_fn = model.eps_fn(rng_dropout)
    if levels is None:
        diff, aux = diffusion.diffusion_loss(
            rng_diffusion, f, model.schedule, eps_fn, num_steps=settings.num_steps,
            time_sampler=settings.time_sampler, weighting=settings.weighting, prediction=model.prediction,
            logsnr_density=density, return_aux=True)
    else:  # same randomness as diffusion_loss: the times came from rng_t, the noise from rng_eps
        _, rng_eps = jax.random.split(rng_diffusion)
        s, ds = levels
        gamma_t = gamma_0 + (gamma_1 - gamma_0) * s
        diff = diffusion.denoising_loss(rng_eps, f, gamma_t, (gamma_1 - gamma_0) * ds, eps_fn,
                                        prediction=model.prediction)
        aux = {"logsnr": -gamma_t, "log_p": None}
    elbo_diffusion = diff / settings.weighting(aux["logsnr"])
    scale = _bpd_scale(model)
    total = prior + reconstruction + diff
    metrics = {
        "loss": jnp.mean(total) * scale,
        "bpd": jnp.mean(prior + reconstruction + elbo_diffusion) * scale,
        "bpd_prior": jnp.mean(prior) * scale,
        "bpd_reconstruction": jnp.mean(reconstruction) * scale,
        "bpd_diffusion": jnp.mean(elbo_diffusion) * scale,
        "gamma_0": gamma_0,
        "gamma_1": gamma_1,
        "per_example_loss": total * scale,
        "diffusion_nats": diff,
        "logsnr": aux["logsnr"],
    }
    if aux["log_p"] is not None:
        metrics["integrand"] = diff * jnp.exp(aux["log_p"])
    return jnp.mean(total) * scale, metrics


def evaluation_terms(model: VDM, rng: jax.Array, x: jax.Array, *, num_steps: int = 0) -> dict:
    """The true VLB terms per example (``diffusion.vlb``), no dropout, any training weighting."""
    return diffusion.vlb(rng, x, model.schedule, model.eps_fn(), vocab_size=model.vocab_size,
                         num_steps=num_steps, time_sampler="low_discrepancy", prediction=model.prediction)


def generate(model: VDM, rng: jax.Array, num_images: int, *, num_steps: int, sampler: str = "ancestral"):
    """``num_images`` samples of the model as integers [N, *image_shape]."""
    # The sampler loops with lax.fori_loop; NNX modules must not cross into that trace,
    # so the loop body rebuilds the model from its (closed-over) state.
    graphdef, state = nnx.split(model)

    def denoise(z, gamma):  # samplers work in eps; convert x / v outputs here, once
        m = nnx.merge(graphdef, state)
        return diffusion.to_eps(m.prediction, m.eps_fn()(z, gamma), z, gamma)

    def gamma_fn(t):
        return nnx.merge(graphdef, state).schedule(t)

    return samplers.generate(rng, denoise, gamma_fn, (num_images,) + model.image_shape,
                             num_steps=num_steps, vocab_size=model.vocab_size, sampler=sampler)
