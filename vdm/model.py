"""The VDM model: a noise schedule and a denoising network, and sampling from them.

``VDM`` is a Flax NNX module with two parts, ``schedule`` (t -> gamma) and ``network``
(z_t, gamma_t, cond -> an eps-, x-, v-, F- or o-prediction, ``vdm.predictions``), plus static facts about the data:

    model = VDM.from_config(config, image_shape=(28, 28, 1), vocab_size=256, rngs=nnx.Rngs(0))
    eps_hat = model.eps(z, gamma, cond)                  # the denoiser, converted to eps
    images, nfe = generate(model, rng, 16, num_steps=256, labels=jnp.arange(16) % 10, guidance=1.0)

What is trained and how is ``vdm.objective``; the bounds reported on test data are
``vdm.evaluation``. gamma is per example [B], or per element of the data when the schedule says
so (``schedule.elementwise``): the network is then built to take the map too (``gamma_map``).

Class-conditional models (``num_classes > 0``) condition the network on
``cond = {"label": ...}``; a label equal to ``num_classes`` is the null class that
``vdm.objective``'s label dropout trains, so one network learns both p(x | y) and p(x).
``generate`` combines the two by classifier-free guidance (Ho & Salimans 2022). Their bound is
the conditional one, -log p(x | y).
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import diffusion, latent, moving_mean, nets, options, predictions, samplers, schedules
from vdm.nets import kernels


class ScheduleArguments(NamedTuple):
    """What VDM passes every schedule itself; ``config.model.schedule_kwargs`` cannot set these."""

    gamma_min: float
    gamma_max: float
    rngs: nnx.Rngs
    data_shape: tuple  # the shape of one example: ``vdm.schedules.build`` passes it to schedules per element only
    latent_size: int  # MuLAN's auxiliary latent: passed to schedules conditioned on it only


class NetworkArguments(NamedTuple):
    """What VDM passes every network itself; ``config.model.network_kwargs`` cannot set these.

    ``vdm.configlib`` reads the fields. Whatever the model tells its networks (the data's shape, the gamma
    range, classes, the gamma map, remat, convolutions, dtype) is one ``vdm.nets.NetworkContext``: a new
    argument is a field there and its value in ``VDM.__init__``, and no network's signature changes.
    """

    context: nets.NetworkContext
    rngs: nnx.Rngs


class VDM(nnx.Module):
    """Schedule + denoising network for data of shape ``image_shape`` with ``vocab_size`` values.

    ``convolution_gradient`` and ``weight_gradient`` choose how the network's convolutions are
    differentiated (``vdm.nets.kernels.Convolutions``): speed only, never values or parameters.
    """

    def __init__(self, *, image_shape: tuple, vocab_size: int, schedule: str, gamma_min: float,
                 gamma_max: float, network: str, prediction: str = "eps", num_classes: int = 0,
                 dtype: str = "float32", remat: bool = False, convolution_gradient: str = "auto",
                 weight_gradient: str = "auto", schedule_kwargs: dict | None = None,
                 network_kwargs: dict | None = None, latent_size: int = 0, latent_encoder: str = "mlp",
                 latent_encoder_kwargs: dict | None = None, mean_encoder: str = "",
                 mean_encoder_kwargs: dict | None = None, rngs: nnx.Rngs):
        self.image_shape = tuple(int(d) for d in image_shape)
        self.vocab_size = int(vocab_size)
        self.prediction = prediction
        self.num_classes = int(num_classes)
        self.latent_size = int(latent_size)
        self.latent_encoder = (latent.build(latent_encoder, data_shape=self.image_shape, latent_size=self.latent_size,
                                            rngs=rngs, **(latent_encoder_kwargs or {})) if self.latent_size else None)
        arguments = ScheduleArguments(gamma_min, gamma_max, rngs, self.image_shape, self.latent_size)
        self.schedule = schedules.build(schedule, **arguments._asdict(), **(schedule_kwargs or {}))
        network_cls = nets.lookup(network)
        self.flatten = network_cls.input_rank == 2  # the network takes vectors [B, D], not images
        context = nets.NetworkContext(
            data_shape=self.image_shape, gamma_min=gamma_min, gamma_max=gamma_max, num_classes=self.num_classes,
            latent_size=self.latent_size, gamma_map=self.elementwise, remat=remat,
            convolutions=kernels.Convolutions(gradient=convolution_gradient, weight_gradient=weight_gradient),
            dtype=jnp.dtype(dtype))
        self.network = network_cls(**NetworkArguments(context, rngs)._asdict(), **(network_kwargs or {}))
        encoder = None  # DiffEnc's y(f, gamma) (``vdm.moving_mean``): a network of ``vdm.nets`` too, unconditioned
        self.mean_encoder_flat = False
        if mean_encoder:
            encoder_cls = nets.lookup(mean_encoder)
            self.mean_encoder_flat = encoder_cls.input_rank == 2
            plain = dataclasses.replace(context, num_classes=0, latent_size=0, gamma_map=False)
            encoder = encoder_cls(**NetworkArguments(plain, rngs)._asdict(), **(mean_encoder_kwargs or {}))
        self.mean_encoder = encoder

    @property
    def elementwise(self) -> bool:
        """Whether gamma has one value per element of the data (the schedule's declaration)."""
        return self.schedule.elementwise

    @classmethod
    def from_config(cls, config, *, image_shape: tuple, vocab_size: int, rngs: nnx.Rngs) -> "VDM":
        c = config.model
        return cls(image_shape=image_shape, vocab_size=vocab_size, schedule=c.schedule, gamma_min=c.gamma_min,
                   gamma_max=c.gamma_max, network=c.network, prediction=c.prediction, num_classes=c.num_classes,
                   dtype=c.dtype, remat=c.remat, convolution_gradient=c.convolution_gradient,
                   weight_gradient=c.weight_gradient, schedule_kwargs=dict(c.schedule_kwargs),
                   network_kwargs=dict(c.network_kwargs), latent_size=c.latent_size, latent_encoder=c.latent_encoder,
                   latent_encoder_kwargs=dict(c.latent_encoder_kwargs), mean_encoder=c.mean_encoder,
                   mean_encoder_kwargs=dict(c.mean_encoder_kwargs), rngs=rngs)

    @property
    def num_dims(self) -> int:
        return math.prod(self.image_shape)

    def denoiser(self, dropout_rng: jax.Array | None = None):
        """The network as ``(z_t, gamma_t, cond) -> output`` (what ``prediction`` names; dropout iff a key is given)."""

        def fn(z, gamma, cond=None):
            return _call(self.network, self.flatten, z, gamma, cond, dropout_rng)

        return fn

    def mean_offset(self, f: jax.Array, gamma: jax.Array) -> jax.Array:
        """DiffEnc's shift of the mean, r(f, gamma) = sigma^2(gamma) y(f, gamma) (``vdm.moving_mean``), gamma [B]."""
        y = _call(self.mean_encoder, self.mean_encoder_flat, f, gamma, None, None)
        return jax.nn.sigmoid(diffusion.expand_to(gamma, f)) * y

    def to_eps(self, out: jax.Array, z: jax.Array, gamma: jax.Array) -> jax.Array:
        """The network's output as the model's eps-prediction: ``predictions.to_eps`` of its parameterisation, and for
        a model with a mean encoder (DiffEnc) ``vdm.moving_mean.effective_eps`` of that."""
        eps_hat = predictions.to_eps(self.prediction, out, z, gamma)
        if self.mean_encoder is None:
            return eps_hat
        return moving_mean.effective_eps(self.mean_offset, eps_hat, z, gamma)

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
            return self.to_eps(fn(z, gamma, cond), z, gamma)
        b = z.shape[0]
        null = jnp.full_like(cond["label"], self.num_classes)
        g = jnp.broadcast_to(gamma, (b,)) if jnp.ndim(gamma) == 0 else gamma
        zz, gg = jnp.concatenate([z, z]), jnp.concatenate([g, g])
        both = {k: jnp.concatenate([v, null if k == "label" else v]) for k, v in cond.items()}
        out = self.to_eps(fn(zz, gg, both), zz, gg)
        return (1.0 + guidance) * out[:b] - guidance * out[b:]

    def with_latent(self, x: jax.Array, rng: jax.Array, cond: dict | None) -> tuple[dict | None, jax.Array | None]:
        """(``cond`` with MuLAN's auxiliary latent c ~ q(c | x) [B, latent_size] as ``"latent"``, KL(q(c | x) ||
        N(0, I)) in nats [B]) for data ``x`` in {0..V-1} (``vdm.latent``); ``(cond, None)`` for a model without one."""
        if not self.latent_size:
            return cond, None
        mu, log_var = self.latent_encoder(diffusion.encode(x, self.vocab_size))
        return (cond or {}) | {"latent": latent.sample(rng, mu, log_var)}, latent.kl_to_prior(mu, log_var)

    def gamma_fn(self, cond: dict | None = None):
        """The schedule as ``t -> gamma`` for ``cond``: bound to ``cond["latent"]`` if it is conditioned on one."""
        return schedules.bind(self.schedule, None if cond is None else cond.get("latent"))

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


def _call(network, flatten: bool, z, gamma, cond, dropout_rng):
    """``network(z, gamma, cond)`` on data of any shape: flattened first for a network of vectors (``flatten``)."""
    shape = z.shape
    if flatten:
        z = z.reshape(shape[0], -1)
        gamma = gamma.reshape(shape[0], -1) if jnp.ndim(gamma) > 1 else gamma
    return network(z, gamma, cond, dropout_rng=dropout_rng).reshape(shape)


def pure_functions(model: VDM, guidance: float | jax.Array = 0.0, cond: dict | None = None):
    """(eps_fn(z, gamma, cond), gamma_fn(t)) of the model for loops and solvers (lax.fori_loop,
    lax.map, diffrax): NNX modules must not cross into those traces, so each call rebuilds the
    model from its closed-over state. ``gamma_fn`` is the schedule for ``cond`` (``VDM.gamma_fn``)."""
    graphdef, state = nnx.split(model)

    def eps_fn(z, gamma, cond):
        return nnx.merge(graphdef, state).eps(z, gamma, cond, guidance)

    def gamma_fn(t):
        return nnx.merge(graphdef, state).gamma_fn(cond)(t)

    return eps_fn, gamma_fn


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


def _class_index(y) -> int | None:
    """``y`` as a Python int if it is an integer (not a bool), else None."""
    try:
        return None if isinstance(y, bool) else operator.index(y)
    except TypeError:
        return None


def check_labels(labels, num_classes: int) -> tuple[int, ...]:
    """The classes to sample (``config.sample.labels``) as a tuple of ints, after the one check of them
    (for ``vdm.configlib`` and :func:`spread_labels`): integers in 0..num_classes-1 of a class-conditional
    model. Raises ``vdm.options.OptionError``."""
    if num_classes < 1:
        raise options.OptionError("labels", labels, "needs a class-conditional model (num_classes > 0)")
    try:
        values = tuple(_class_index(y) for y in labels)
    except TypeError:  # not a sequence
        values = (None,)
    if not all(y is not None and 0 <= y < num_classes for y in values):
        raise options.OptionError("labels", labels, f"must be class indices, integers in 0..{num_classes - 1}")
    return values


def spread_labels(num_images: int, num_classes: int, labels=()) -> jax.Array:
    """The classes of ``num_images`` samples: ``labels`` repeated to fill, or an even spread 0, 1, ..., K-1, 0, ..."""
    pattern = jnp.asarray(check_labels(labels, num_classes) or tuple(range(num_classes)), jnp.int32)
    return jnp.resize(pattern, (num_images,))


class Samples(NamedTuple):
    images: jax.Array  # int32 [N, *image_shape] in {0..V-1}
    nfe: jax.Array  # int32 scalar: network evaluations the sampler took (a guided call counts once)


def generation(model: VDM, rng: jax.Array, num_images: int, *, num_steps: int, sampler: str = "ancestral",
               labels: jax.Array | None = None, guidance: float | jax.Array = 0.0,
               sampler_kwargs=None) -> samplers.Generation:
    """Sampling from ``model`` as a ``vdm.samplers.Generation`` (noise, the sampler's loop, the
    decoder), for running the loop in chunks; :func:`generate` runs it in one call."""
    cond = None if labels is None else {"label": jnp.asarray(labels, jnp.int32)}
    if model.latent_size:  # MuLAN: c from its prior, one per image
        c = latent.prior_sample(jax.random.fold_in(rng, latent.STREAM), num_images, model.latent_size)
        cond = (cond or {}) | {"latent": c}
    eps_fn, gamma_fn = pure_functions(model, guidance, cond)
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
