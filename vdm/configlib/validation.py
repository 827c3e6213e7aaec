"""Checking a config before anything is written or compiled: ``validate`` and ``validate_against_data``.

``validate`` raises ``ConfigError`` with one line naming the bad field. It runs in this order, so that no
check meets a value an earlier one should have refused:

1. every float is finite, and the seed is one ``jax.random.key`` takes as it is;
2. every name the config gives is looked up in its registry: each piece of ``PIECES`` (``schedule``,
   ``network``, ``mean encoder``, ``latent encoder``, ``weighting``, ``data source``, ``sampler``) and each
   other named choice (``NAMED``): an unknown name reads ``config.<field>='bogus': valid names: ...``;
3. every keyword argument a piece is given is one it takes, and none it needs is missing;
4. the values of a piece's options are the piece's to check (``vdm.options``): ``validate`` asks it
   (``samplers.check_options``, ``likelihood.check_options``, ``schedules.check_endpoints``,
   ``model.check_labels``, ``data.check_options``) and names the field of the option it rejects;
5. the ranges and combinations of the remaining fields.

``validate_against_data`` checks what needs the data set's description (``vdm.data.DatasetInfo``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from flax import nnx

from vdm import (data, evaluation, health, inception, likelihood, objective, optimizer, options, predictions, registry,
                 samplers, schedules, time_sampling, weightings)
from vdm import model as model_lib
from vdm.configlib.renames import RENAMED
from vdm.configlib.schema import COMPUTE_DTYPES, PIECES, ConfigError, field_value
from vdm.nets import kernels

MAX_GUIDANCE = 100.0  # classifier-free guidance weights above this are refused

# jax.random.key's seeds: a 32-bit unsigned integer (it wraps others onto these: 2**32 would be seed 0 again)
SEEDS = 2**32

# The fields besides ``PIECES`` that name an entry of a table (and take no keyword arguments):
# (field, table, whether the empty name means none).
NAMED = (
    ("model.prediction", predictions.PREDICTIONS, False),
    ("model.dtype", COMPUTE_DTYPES, False),
    ("loss.time_sampler", time_sampling.TIME_SAMPLERS, False),
    ("loss.importance_sampling", time_sampling.DENSITIES, True),
    ("train.lr_schedule", optimizer.LR_SCHEDULES, False),
    ("eval.method", evaluation.EVALUATIONS, False),
)


def _fail(field: str, value, problem: str):
    raise ConfigError(f"config.{field}={value!r}: {problem}")


def _ask(prefix: str, check: Callable, *args) -> None:
    """Run a piece's own check of its options; the option it rejects is the field ``prefix.<option>``."""
    try:
        check(*args)
    except options.OptionError as e:
        _fail(f"{prefix}.{e.option}", e.value, e.problem)


def _choice(field: str, value, table) -> None:
    try:
        registry.lookup(table, value, field)
    except ValueError as e:
        _fail(field, value, "valid names:" + str(e).split("valid names:")[1])


def _check_names(config) -> None:
    """Every name the config gives, looked up in its registry (before any piece is asked about its options)."""
    for piece in PIECES:
        name = field_value(config, piece.name_field)
        if not (piece.optional and not name):
            _choice(piece.name_field, name, piece.table)
    for field, table, optional in NAMED:
        name = field_value(config, field)
        if not (optional and not name):
            _choice(field, name, table)


def _schedule(config):
    """The configured schedule, built abstractly (no arrays) for data of one element (the data are not read yet):
    to ask it what it learns and whether it is per element."""
    c = config.model
    try:
        return nnx.eval_shape(lambda: schedules.build(c.schedule, gamma_min=c.gamma_min, gamma_max=c.gamma_max,
                                                      rngs=nnx.Rngs(0), data_shape=(1,), latent_size=c.latent_size,
                                                      **dict(c.schedule_kwargs)))
    except options.OptionError as e:
        if e.option == "latent_size":
            _fail("model.latent_size", e.value, e.problem)
        _fail("model.schedule_kwargs", dict(c.schedule_kwargs), str(e))
    except ValueError as e:
        _fail("model.schedule_kwargs", dict(c.schedule_kwargs), str(e))


def _check_kwargs(config) -> None:
    """Every keyword argument given to a piece is one it takes; every one it needs is given (names checked)."""
    for piece in PIECES:
        name = field_value(config, piece.name_field)
        accepted = piece.accepted(name)
        kwargs = field_value(config, piece.kwargs_field)
        for key, value in kwargs.items():
            if key not in accepted:
                _fail(f"{piece.kwargs_field}.{key}", value,
                      f"{piece.kind} {name!r} takes {', '.join(accepted) or 'no keyword arguments'}")
        for key in piece.required(name):
            if key not in kwargs:
                raise ConfigError(f"config.{piece.kwargs_field}.{key} is missing: {piece.kind} {name!r} needs it "
                                  f"(e.g. --config.{piece.kwargs_field}.{key}=...)")


def _nonfinite_fields(tree, prefix: str = "") -> list[tuple[str, float]]:
    """(dotted name, value) of every NaN or infinite float in a config (nested dicts, lists, tuples)."""
    items = tree.items() if hasattr(tree, "items") else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    out = []
    for key, value in items:
        name = f"{prefix}.{key}" if prefix and not isinstance(key, int) else f"{prefix}[{key}]" if prefix else str(key)
        if isinstance(value, float) and not math.isfinite(value):
            out.append((name, value))
        else:
            out += _nonfinite_fields(value, name)
    return out


def validate(config) -> None:
    """Check names, ranges and combinations (in the order of the module's docstring), before anything is written
    or compiled.

    Args:
        config: a config of ``base_config``'s fields.

    Raises:
        ConfigError: one line naming the first bad field and what is wrong with it (an old name of ``RENAMED``
            still set, on a config never resolved, is one).
    """
    model, loss, opt = config.model, config.loss, config.train
    for old, new in RENAMED.items():  # set on a config no resolution has seen (apply_deprecated): it would be ignored
        section, name = old.rsplit(".", 1)
        if field_value(config, section).get(name) is not None:
            _fail(old, field_value(config, section)[name], f"the deprecated name of config.{new}, read only where a "
                  "config is resolved (vdm.train.resolve_config, configlib.override, the command line): set "
                  f"config.{new}")
    for name, value in _nonfinite_fields(config)[:1]:
        _fail(name, value, "must be finite")
    if not 0 <= config.seed < SEEDS:
        _fail("seed", config.seed, "must be in [0, 2**32): jax.random.key takes a 32-bit seed (it would wrap this "
              "one onto another)")
    _check_names(config)
    _check_kwargs(config)
    _ask("sample.sampler_kwargs", samplers.check_options, config.sample.sampler_kwargs.to_dict())
    _ask("data.kwargs", data.check_options, config.data.kwargs.to_dict())
    _ask("model", schedules.check_endpoints, model.gamma_min, model.gamma_max)
    try:
        weightings.build(loss.weighting, **dict(loss.weighting_kwargs))
    except ValueError as e:
        _fail("loss.weighting_kwargs", dict(loss.weighting_kwargs), str(e))
    schedule = _schedule(config)
    try:
        objective.Objective.from_config(config).check(schedule)
    except objective.ObjectiveError as e:
        _fail(e.field, e.value, e.problem)
    _ask("model", lambda: kernels.check_options(convolution_gradient=model.convolution_gradient,
                                                weight_gradient=model.weight_gradient))
    if model.num_classes < 0:
        _fail("model.num_classes", model.num_classes, "must be >= 0 (0 = unconditional)")
    if model.latent_size < 0:
        _fail("model.latent_size", model.latent_size, "must be >= 0 (0 = no auxiliary latent)")
    if model.mean_encoder:
        try:  # training is Objective.check's (above); the evaluated bound is the elbo with eval.timesteps
            dataclasses.replace(objective.EVALUATION, num_steps=config.eval.timesteps).check_mean_encoder(False)
        except ValueError as e:
            _fail("eval.timesteps", config.eval.timesteps, str(e))
    if not 0 <= config.sample.guidance <= MAX_GUIDANCE:
        _fail("sample.guidance", config.sample.guidance, f"must be in [0, {MAX_GUIDANCE:g}] (0 = no guidance; "
              "published weights are 0.1 to 10, and 1e30 overflows float32 into an all-black sample grid)")
    if config.sample.guidance and not model.num_classes:
        _fail("sample.guidance", config.sample.guidance, "needs a class-conditional model (model.num_classes > 0)")
    if config.sample.labels:
        _ask("sample", model_lib.check_labels, config.sample.labels, model.num_classes)
    for name in ("num_steps", "batch_size", "steps_per_call", "log_every", "eval_every", "checkpoint_every",
                 "keep_checkpoints"):
        if int(opt[name]) < 1:
            _fail(f"train.{name}", opt[name], "must be >= 1")
    if opt.skip_nonfinite < 0:
        _fail("train.skip_nonfinite", opt.skip_nonfinite, "must be >= 0 (0 = stop at the first non-finite step)")
    _ask("train", lambda: health.check_limits(**{k: opt[k] for k in health.Limits.FIELDS}))
    for name in ("num_steps", "log_every", "eval_every", "checkpoint_every"):
        if opt[name] % opt.steps_per_call:
            _fail(f"train.{name}", opt[name], f"must be a multiple of train.steps_per_call={opt.steps_per_call}")
    if opt.lr <= 0:
        _fail("train.lr", opt.lr, "must be positive")
    if not 0.0 <= opt.ema_decay < 1.0:
        _fail("train.ema_decay", opt.ema_decay, "must be in [0, 1)")
    if config.eval.batch_size < 1:
        _fail("eval.batch_size", config.eval.batch_size, "must be >= 1")
    _ask("eval.ode", likelihood.check_options, config.eval.ode.to_dict())
    if config.eval.inception_weights:
        problem = inception.weights_problem(config.eval.inception_weights)
        if problem is not None:
            _fail("eval.inception_weights", config.eval.inception_weights, problem)
    if config.eval.num_examples < 0:
        _fail("eval.num_examples", config.eval.num_examples, "must be >= 0 (0 = the whole test split)")
    if config.eval.score_draws < 4 or config.eval.score_draws % 4:
        _fail("eval.score_draws", config.eval.score_draws, "must be a positive multiple of 4 (vdm.image_bpd.PASSES)")
    for field in ("steps", "num_images"):
        if config.sample[field] < 1:
            _fail(f"sample.{field}", config.sample[field], "must be >= 1")


def validate_against_data(config, info) -> None:
    """Check the config against the data set it will train on.

    Args:
        config: a config that ``validate`` passed.
        info: the data's ``vdm.data.DatasetInfo``.

    Raises:
        ConfigError: one line naming the field the data rule out.
    """
    if config.train.batch_size > info.num_train:
        _fail("train.batch_size", config.train.batch_size, f"larger than the {info.num_train} training examples")
    if config.sample.fd_mnist and (tuple(info.shape) != (28, 28, 1) or info.vocab_size != 256):
        _fail("sample.fd_mnist", True, f"needs 28x28 digits with 256 levels, not {info.name} {tuple(info.shape)} x "
              f"{info.vocab_size} levels")
    if config.eval.inception_weights and (info.kind != "image" or info.shape[-1] not in (1, 3)):
        _fail("eval.inception_weights", config.eval.inception_weights, f"FID needs RGB or grayscale images, not "
              f"{info.name} ({info.kind} of shape {tuple(info.shape)})")
    distances = [name for name, on in (("FD-MNIST", config.sample.fd_mnist), ("FID", config.eval.inception_weights))
                 if on]
    if distances and config.sample.num_images < 2:
        _fail("sample.num_images", config.sample.num_images,
              f"{' and '.join(distances)} need{'s' * (len(distances) == 1)} at least 2 samples")
    num_classes = config.model.num_classes
    if num_classes and not info.num_classes:
        _fail("model.num_classes", num_classes, f"needs labels, and data source {config.data.source!r} has none")
    if num_classes and num_classes < info.num_classes:
        _fail("model.num_classes", num_classes, f"data source {config.data.source!r} has {info.num_classes} classes")
