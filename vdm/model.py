"""The VDM model and the objective it owns.

``VDM`` is a Flax NNX module with two parts, ``schedule`` (t -> gamma) and ``network``
(z_t, gamma_t, cond -> an eps-, x- or v-prediction), plus static facts about the data.
Everything the trainer needs from it is here, as functions of the parameters:

    model = VDM.from_config(config, image_shape=(28, 28, 1), vocab_size=256, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    objective = Objective.from_config(config)
    loss, grads, terms = loss_and_grads(graphdef, params, batch, rng, objective)
    terms = evaluation_terms(model, batch, rng)          # the true VLB, per example
    bpd_sums(terms, model.num_dims)                      # -> {"bpd": ..., "count": ...}
    images, nfe = generate(model, rng, 16, num_steps=256, labels=jnp.arange(16) % 10, guidance=1.0)

A batch is a dict ``{"image": uint8 [B, H, W, C], "label": int32 [B]}`` (``label`` only
when the data have labels). ``loss_and_grads`` draws all randomness of a step from one key,
once (``draw``), and returns a ``Terms`` record of per-example values; the trainer knows
nothing of schedules, RNG splits or term names.

Class-conditional models (``num_classes > 0``) condition the network on
``cond = {"label": ...}`` and train with label dropout: each label is replaced by the null
class (index ``num_classes``) with probability ``Objective.label_dropout``, so one network
learns both p(x | y) and p(x). ``generate`` combines the two by classifier-free guidance
(Ho & Salimans 2022). Their bound is the conditional one, -log p(x | y).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import diffusion, likelihood, nets, samplers, schedules, time_sampling, weightings
from vdm.nets import kernels


class VDM(nnx.Module):
    """Schedule + denoising network for data of shape ``image_shape`` with ``vocab_size`` values.

    ``convolution_gradient`` and ``weight_gradient`` choose how the network's convolutions are
    differentiated (``vdm.nets.kernels.Convolutions``): speed only, never values or parameters.
    """

    def __init__(self, *, image_shape: tuple, vocab_size: int, schedule: str, gamma_min: float,
                 gamma_max: float, network: str, prediction: str = "eps", num_classes: int = 0,
                 dtype: str = "float32", remat: bool = False, convolution_gradient: str = "auto",
                 weight_gradient: str = "auto", schedule_kwargs: dict | None = None,
                 network_kwargs: dict | None = None, rngs: nnx.Rngs):
        self.image_shape = tuple(int(d) for d in image_shape)
        self.vocab_size = int(vocab_size)
        self.prediction = prediction
        self.num_classes = int(num_classes)
        self.schedule = schedules.build(schedule, gamma_min=gamma_min, gamma_max=gamma_max, rngs=rngs,
                                        **(schedule_kwargs or {}))
        network_cls = nets.lookup(network)
        self.flatten = network_cls.input_rank == 2  # the network takes vectors [B, D], not images
        in_channels = math.prod(self.image_shape) if self.flatten else self.image_shape[-1]
        convolutions = kernels.Convolutions(gradient=convolution_gradient, weight_gradient=weight_gradient)
        self.network = network_cls(in_channels=in_channels, gamma_min=gamma_min, gamma_max=gamma_max,
                                   num_classes=self.num_classes, dtype=jnp.dtype(dtype), remat=remat,
                                   convolutions=convolutions, rngs=rngs, **(network_kwargs or {}))

    @classmethod
    def from_config(cls, config, *, image_shape: tuple, vocab_size: int, rngs: nnx.Rngs) -> "VDM":
        c = config.model
        return cls(image_shape=image_shape, vocab_size=vocab_size, schedule=c.schedule, gamma_min=c.gamma_min,
                   gamma_max=c.gamma_max, network=c.network, prediction=c.prediction, num_classes=c.num_classes,
                   dtype=c.dtype, remat=c.remat, convolution_gradient=c.convolution_gradient,
                   weight_gradient=c.weight_gradient, schedule_kwargs=dict(c.schedule_kwargs),
                   network_kwargs=dict(c.network_kwargs), rngs=rngs)

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)

    def denoiser(self, dropout_rng: jax.Array | None = None):
        """The network as ``(z_t, gamma_t, cond) -> output`` (eps, x or v; dropout iff a key is given)."""

        def fn(z, gamma, cond=None):
            shape = z.shape
            if self.flatten:
                z = z.reshape(shape[0], -1)
            return self.network(z, gamma, cond, dropout_rng=dropout_rng).reshape(shape)

        return fn

    def eps(self, z: jax.Array, gamma: jax.Array, cond: dict | None = None,
            guidance: float | jax.Array = 0.0) -> jax.Array:
        """eps_hat(z_t, gamma_t, cond), with classifier-free guidance of weight ``guidance``.

        With a label and ``guidance = w > 0`` (Ho & Salimans 2022):
        ``(1 + w) eps(z, y) - w eps(z, null)``, both evaluated in one network call.
        ``w = 0`` is the plain conditional model; ``cond=None`` the unconditional one.
        A Python number 0 skips the unconditional half; an array ``w`` (e.g. a jit argument, so
        that one compiled sampler serves a sweep of weights) always takes the guided form.
        """
        fn = self.denoiser()
        if cond is None or (isinstance(guidance, (int, float)) and not guidance):
            return diffusion.to_eps(self.prediction, fn(z, gamma, cond), z, gamma)
        b = z.shape[0]
        null = jnp.full_like(cond["label"], self.num_classes)
        zz, gg = jnp.concatenate([z, z]), jnp.concatenate([jnp.broadcast_to(gamma, (b,))] * 2)
        out = diffusion.to_eps(self.prediction, fn(zz, gg, {"label": jnp.concatenate([cond["label"], null])}), zz, gg)
        return (1.0 + guidance) * out[:b] - guidance * out[b:]

    def condition(self, batch: dict, rng: jax.Array | None = None, label_dropout: float = 0.0) -> dict | None:
        """The ``cond`` of a batch: ``None`` for an unconditional model, else ``{"label": labels}``.

        With ``rng`` and ``label_dropout > 0`` each label becomes the null class with that probability.
        """
        if not self.num_classes:
            return None
        if "label" not in batch:
            raise ValueError(f"a class-conditional model (num_classes={self.num_classes}) needs batches with labels")
        labels = jnp.asarray(batch["label"], jnp.int32)
        if rng is not None and label_dropout > 0:
            labels = jnp.where(jax.random.bernoulli(rng, label_dropout, labels.shape), self.num_classes, labels)
        return {"label": labels}


# --------------------------------------------------------------------------------------
# What is trained
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the training objective is: the config's ``loss`` section, resolved."""

    weighting: weightings.Weighting = weightings.WEIGHTINGS["elbo"]
    num_steps: int = 0  # 0: continuous time
    time_sampler: str = "low_discrepancy"
    importance_sampling: str = ""  # "", or a name in time_sampling.DENSITIES
    density_bins: int = 100
    logsnr_range: tuple[float, float] = (-5.0, 13.3)  # where importance sampling draws log-SNR
    variance_schedule_grad: bool = False
    label_dropout: float = 0.0

    @classmethod
    def from_config(cls, config) -> "Objective":
        c = config.loss
        return cls(weighting=weightings.build(c.weighting, **dict(c.weighting_kwargs)), num_steps=int(c.num_steps),
                   time_sampler=c.time_sampler, importance_sampling=c.importance_sampling,
                   density_bins=int(c.density_bins),
                   logsnr_range=(-float(config.model.gamma_max), -float(config.model.gamma_min)),
                   variance_schedule_grad=bool(c.variance_schedule_grad), label_dropout=float(c.label_dropout))

    def initial_density(self):
        """The log-SNR density that importance sampling starts from, or None (uniform t)."""
        if not self.importance_sampling:
            return None
        return time_sampling.build_density(self.importance_sampling, self.weighting, *self.logsnr_range,
                                           num_bins=self.density_bins)

    def update_density(self, density, terms: "Terms"):
        """The density after one step: the adaptive one folds in this batch's integrands."""
        if not isinstance(density, time_sampling.AdaptiveDensity):
            return density
        # The trained term is 0.5 (w / p) ||eps - eps_hat||^2; the integrand is 0.5 w ||...||^2.
        return density.update(terms.logsnr, terms.diffusion * jnp.exp(density.log_prob(terms.logsnr)))


# The true VLB: elbo weighting, continuous time, and iid t per image. Low-discrepancy times are
# spread over a batch's rows, so on a padded last batch the real images would see only part of
# [0, 1] (a biased bound), and per-image values would not be independent (a wrong standard error).
EVALUATION = Objective(time_sampler="iid")


class Terms(NamedTuple):
    """One Monte Carlo draw of the objective, per example [B], in nats.

    ``diffusion`` is the trained diffusion term, ``weight`` times the VLB's: the VLB
    estimate is ``prior + reconstruction + diffusion / weight``, the training loss
    ``prior + reconstruction + diffusion``. For the plain ELBO ``weight`` is 1.
    """

    prior: jax.Array
    reconstruction: jax.Array
    diffusion: jax.Array
    weight: jax.Array  # w(lambda_t) of the weighting
    logsnr: jax.Array  # lambda_t = -gamma_t
    gamma_0: jax.Array  # scalars: the schedule's endpoints
    gamma_1: jax.Array

    @property
    def loss(self) -> jax.Array:
        return self.prior + self.reconstruction + self.diffusion

    @property
    def vlb(self) -> jax.Array:
        return self.prior + self.reconstruction + self.diffusion / self.weight


def bpd_sums(terms: Terms, num_dims: int, mask: jax.Array | None = None) -> dict:
    """Sums over the examples (where ``mask``) of each term in bits/dim, and their ``count``.

    Divide by ``count`` for means: the trainer does so per batch, evaluation after a full pass.
    """
    mask = jnp.ones(terms.prior.shape, bool) if mask is None else mask
    per_example = {"loss": terms.loss, "bpd": terms.vlb, "bpd_prior": terms.prior,
                   "bpd_reconstruction": terms.reconstruction, "bpd_diffusion": terms.diffusion / terms.weight}
    sums = {k: jnp.sum(jnp.where(mask, diffusion.bits_per_dim(v, num_dims), 0.0)) for k, v in per_example.items()}
    return sums | {"count": jnp.sum(mask.astype(jnp.float32))}


class Draw(NamedTuple):
    """All randomness of one step of the objective."""

    u: jax.Array  # [B] uniforms: the times t, or through a density the log-SNRs
    eps: jax.Array  # key: the diffusion noise
    reconstruction: jax.Array  # key: z_0 of the reconstruction term
    dropout: jax.Array  # key: the network's dropout
    labels: jax.Array  # key: label dropout


def draw(rng: jax.Array, batch_size: int, objective: Objective) -> Draw:
    """Split one key into everything a step draws: the only place that knows the split."""
    rng_diffusion, rng_reconstruction, rng_network = jax.random.split(rng, 3)
    rng_t, rng_eps = jax.random.split(rng_diffusion)
    rng_dropout, rng_labels = jax.random.split(rng_network)
    u = time_sampling.build(objective.time_sampler)(rng_t, batch_size)
    return Draw(u=u, eps=rng_eps, reconstruction=rng_reconstruction, dropout=rng_dropout, labels=rng_labels)


def per_example_terms(model: VDM, batch: dict, d: Draw, objective: Objective, density=None, *,
                      train: bool = True, interior: tuple | None = None, schedule=None) -> Terms:
    """The per-example terms for the randomness ``d``.

    ``train=False`` turns dropout and label dropout off. ``interior=(shape, slope)``
    replaces the schedule's interior by its values shape(t), shape'(t) at t = ``d.u``, so
    that gamma_t = gamma_0 + (gamma_1 - gamma_0) shape (for the variance-minimising
    schedule gradient, which differentiates through them). ``schedule`` (any
    ``t -> gamma`` callable, see ``diffusion.schedule_endpoints``) replaces the model's own;
    the network sees only gamma_t, so with the same endpoints the expected bound is unchanged
    (VDM Sec. 5.1) and only the estimator's variance moves.
    """
    x = batch["image"]
    f = diffusion.encode(x, model.vocab_size)
    cond = model.condition(batch, d.labels, objective.label_dropout if train else 0.0)
    schedule = model.schedule if schedule is None else schedule
    gamma_0, gamma_1 = diffusion.schedule_endpoints(schedule)
    prior = diffusion.prior_kl(f, gamma_1)
    reconstruction = diffusion.reconstruction_nll(d.reconstruction, x, gamma_0, model.vocab_size)
    if interior is None:
        gamma_t, weight_dt, _ = diffusion.noise_levels(d.u, schedule, num_steps=objective.num_steps,
                                                       weighting=objective.weighting, logsnr_density=density)
    else:
        shape, slope = interior
        gamma_t, weight_dt = gamma_0 + (gamma_1 - gamma_0) * shape, (gamma_1 - gamma_0) * slope
    diff = diffusion.denoising_loss(d.eps, f, gamma_t, weight_dt, model.denoiser(d.dropout if train else None),
                                    prediction=model.prediction, cond=cond)
    return Terms(prior=prior, reconstruction=reconstruction, diffusion=diff, weight=objective.weighting(-gamma_t),
                 logsnr=-gamma_t, gamma_0=gamma_0, gamma_1=gamma_1)


def loss_and_grads(graphdef: nnx.GraphDef, params, batch: dict, rng: jax.Array, objective: Objective,
                   density=None) -> tuple[jax.Array, dict, Terms]:
    """The training loss (mean, bits/dim), its gradients w.r.t. ``params`` and the per-example terms.

    ``params`` is the pure dict of the model's parameters. With
    ``objective.variance_schedule_grad`` the schedule's interior gets the gradient of the
    estimator's second moment instead of the loss's (VDM App. I.2) and every other
    parameter the loss gradient, from the same forward and backward pass.
    """
    d = draw(rng, batch["image"].shape[0], objective)
    if objective.variance_schedule_grad:
        return _loss_and_grads_with_schedule_variance(graphdef, params, batch, d, objective)

    def loss_fn(params):
        model = nnx.merge(graphdef, params)
        terms = per_example_terms(model, batch, d, objective, density)
        return diffusion.bits_per_dim(jnp.mean(terms.loss), model.num_dims), terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, terms


def _loss_and_grads_with_schedule_variance(graphdef, params, batch, d: Draw, objective: Objective):
    """VLB gradients for everything but the schedule interior, which gets d E[L^2] (VDM App. I.2), L in bits/dim."""
    model = nnx.merge(graphdef, params)
    graph2, interior, other = nnx.split(model, schedules.ScheduleShape, ...)

    def shape_fn(interior, t):
        return nnx.merge(graph2, interior, other).schedule.shape(t)

    def per_example(other, shape, slope):  # in bits/dim: the interior minimises E[L_diffusion^2] in bpd^2
        m = nnx.merge(graph2, jax.lax.stop_gradient(interior), other)
        terms = per_example_terms(m, batch, d, objective, interior=(shape, slope))
        return (diffusion.bits_per_dim(terms.loss, m.num_dims), diffusion.bits_per_dim(terms.diffusion, m.num_dims),
                terms)

    (loss, terms), g_other, g_interior = diffusion.value_and_grad_with_schedule_variance(
        per_example, shape_fn, interior, other, d.u)
    return loss, nnx.to_pure_dict(nnx.merge_state(g_other, g_interior)), terms


def evaluation_terms(model: VDM, batch: dict, rng: jax.Array, *, num_steps: int = 0) -> Terms:
    """The true VLB terms per example (conditional on the label for a conditional model).

    No dropout, no label dropout, the elbo weighting whatever was trained, T = ``num_steps``
    (0: continuous time).
    """
    objective = dataclasses.replace(EVALUATION, num_steps=num_steps)
    return per_example_terms(model, batch, draw(rng, batch["image"].shape[0], objective), objective, train=False)


def pure_functions(model: VDM, guidance: float | jax.Array = 0.0):
    """(eps_fn(z, gamma, cond), gamma_fn(t)) of the model for loops and solvers (lax.fori_loop,
    lax.map, diffrax): NNX modules must not cross into those traces, so each call rebuilds the
    model from its closed-over state."""
    graphdef, state = nnx.split(model)

    def eps_fn(z, gamma, cond):
        return nnx.merge(graphdef, state).eps(z, gamma, cond, guidance)

    def gamma_fn(t):
        return nnx.merge(graphdef, state).schedule(t)

    return eps_fn, gamma_fn


def ode_nll(model: VDM, batch: dict, rng: jax.Array, *, rtol: float = 1e-5, atol: float = 1e-5,
            divergence: str = "hutchinson", num_probes: int = 1, dequantization: str = "uniform",
            num_samples: int = 1, solver: str = "tsit5") -> tuple[jax.Array, jax.Array]:
    """(-log P(x) in nats per example [B], network evaluations): the probability-flow ODE's
    density dequantised to the discrete data (``vdm.likelihood``), conditional on the label
    for a conditional model (no guidance)."""
    cond = model.condition(batch)
    eps_fn, gamma_fn = pure_functions(model)

    def log_density(key, f):
        result = likelihood.ode_log_likelihood(key, f, gamma_fn, eps_fn, cond=cond, rtol=rtol, atol=atol,
                                               divergence=divergence, num_probes=num_probes, solver=solver)
        return result.log_prob, result.nfe

    return likelihood.discrete_nll(rng, batch["image"], model.vocab_size, log_density,
                                   dequantization=dequantization, num_samples=num_samples,
                                   gamma_0=gamma_fn(jnp.zeros((1,)))[0])


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def spread_labels(num_images: int, num_classes: int, labels=()) -> jax.Array:
    """The classes of ``num_images`` samples: ``labels`` repeated to fill, or an even spread 0, 1, ..., K-1, 0, ..."""
    if num_classes < 1:
        raise ValueError("labels need a class-conditional model (num_classes > 0)")
    pattern = jnp.asarray(tuple(labels) or tuple(range(num_classes)), jnp.int32)
    if jnp.any((pattern < 0) | (pattern >= num_classes)):
        raise ValueError(f"labels {tuple(int(v) for v in pattern)} must lie in 0..{num_classes - 1}")
    return jnp.resize(pattern, (num_images,))


class Samples(NamedTuple):
    images: jax.Array  # int32 [N, *image_shape] in {0..V-1}
    nfe: jax.Array  # int32 scalar: network evaluations the sampler took (a guided call counts once)


def generation(model: VDM, rng: jax.Array, num_images: int, *, num_steps: int, sampler: str = "ancestral",
               labels: jax.Array | None = None, guidance: float | jax.Array = 0.0,
               sampler_kwargs=None) -> samplers.Generation:
    """Sampling from ``model`` as a ``vdm.samplers.Generation`` (noise, the sampler's loop, the
    decoder), for running the loop in chunks; :func:`generate` runs it in one call."""
    eps_fn, gamma_fn = pure_functions(model, guidance)
    cond = None if labels is None else {"label": jnp.asarray(labels, jnp.int32)}
    return samplers.generation(rng, eps_fn, gamma_fn, (num_images,) + model.image_shape, num_steps=num_steps,
                               vocab_size=model.vocab_size, sampler=sampler, cond=cond, **dict(sampler_kwargs or {}))


def generate(model: VDM, rng: jax.Array, num_images: int, *, num_steps: int, sampler: str = "ancestral",
             labels: jax.Array | None = None, guidance: float | jax.Array = 0.0, sampler_kwargs=None) -> Samples:
    """``num_images`` samples of the model, of the classes ``labels`` if given, and their cost.

    ``guidance`` is the classifier-free guidance weight w (0: the plain conditional model; a
    traced array: one compiled sampler for every weight, see ``VDM.eps``);
    ``sampler`` names one of ``vdm.samplers.SAMPLERS`` and ``sampler_kwargs`` its options.
    """
    return Samples(*generation(model, rng, num_images, num_steps=num_steps, sampler=sampler, labels=labels,
                               guidance=guidance, sampler_kwargs=sampler_kwargs).run())
