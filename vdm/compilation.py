"""Compiling a run: its compiled functions kept by whoever runs (``CompileCache``), and XLA's persistent cache
across processes.

``compile_run(config, info, mesh, cache)`` builds the parts of a run through ``cache``: the model's
structure and initialiser, the optimizer, the objective, the jitted train step, the eval and score steps,
and the sampler. Each part is made by one builder from the values given to it, and kept under exactly
those values: the config's sections or fields it reads (each builder is given a config of only those, so a
builder that reads another field fails instead of being keyed wrongly), the data's description, the mesh,
and the parts it is built on. Nothing is excluded by hand. Two runs given one cache share every part whose
inputs are equal, traces and compiled programs and all: a notebook's second run of a config starts at once,
and so does one that differs only in fields a part does not read (the seed, ``train.num_steps`` at a
constant learning rate, how many images are evaluated). A change of what a part reads (``loss.weighting``,
``train.lr``) builds that part, and the parts built on it, again.

The cache belongs to its caller: ``vdm.train.Trainer`` makes one per run unless given one
(``compile_cache=``); the module keeps nothing.

``use_compilation_cache`` points JAX's persistent cache at a directory (``train.compilation_cache_dir``), so
that a second process running the same config skips XLA compilation.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import optax
from flax import nnx

from vdm import evaluation, health, model as model_lib, objective as objective_lib, optimizer, parallel, steps
from vdm.sampling import Sampling


def use_compilation_cache(directory: str) -> str | None:
    """Keep XLA's compiled programs in ``directory`` across processes (JAX's persistent cache).

    Args:
        directory: a directory; ``"auto"``: ``$XDG_CACHE_HOME/vdm/jax`` (default ``~/.cache/vdm/jax``);
            ``""``: off.

    Returns:
        The directory used, or None when off. A second run of the same config then skips XLA compilation.
    """
    if not directory:
        return None
    if directory == "auto":
        directory = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vdm", "jax")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


@dataclasses.dataclass(frozen=True)
class Part:
    """One built part of a run and the key it is kept under (``CompileCache.part``).

    Attributes:
        name: what it is ("model", "train_step", ...).
        key: its builder's name and inputs, canonical (JSON); a part given as an input counts by its key.
        value: what the builder returned.
    """

    name: str
    key: str
    value: Any


def _canonical(value: Any) -> Any:
    """``value`` as JSON-able data that two inputs share exactly when a builder given either builds the same.

    Raises:
        TypeError: a value of a kind a builder's input is not expected to be (a function, an array).
    """
    if isinstance(value, Part):
        return {"part": value.key}
    if isinstance(value, ml_collections.ConfigDict):
        return json.loads(value.to_json_best_effort(sort_keys=True))
    if isinstance(value, jax.sharding.Mesh):
        return {"mesh": [list(value.axis_names), list(value.devices.shape), [d.id for d in value.devices.flat]]}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {type(value).__name__: [_canonical(getattr(value, f.name)) for f in dataclasses.fields(value)]}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return {type(value).__name__: [_canonical(v) for v in value]}
    if isinstance(value, Mapping):
        return {"mapping": sorted([str(k), _canonical(v)] for k, v in value.items())}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return [type(value).__name__, value]  # 1, 1.0 and True stay apart
    raise TypeError(f"a compiled part cannot be keyed on a {type(value).__name__}")


class CompileCache:
    """The compiled functions of runs, kept for whoever holds this object, each under what it was built from.

    Give one cache to two runs (``vdm.train.train_and_evaluate(..., compile_cache=cache)``, ``Trainer``) and the
    second reuses every part of the first whose inputs are equal (the module's docstring). A cache holds
    compiled programs (and their device memory) while it lives: drop it to free them.

    Attributes:
        builds: how many times each part ("model", "optimizer", "objective", "train_step", "eval_steps",
            "sampling") was built: the parts it did not have.
    """

    def __init__(self):
        self._parts: dict[str, Part] = {}
        self.builds: collections.Counter[str] = collections.Counter()

    def part(self, name: str, build: Callable[..., Any], *inputs: Any) -> Part:
        """The part ``build(*values)`` under the key of ``(name, inputs)``: built the first time, then kept.

        Args:
            name: what the part is.
            build: its builder, called with ``inputs`` (each ``Part`` among them replaced by its value).
            *inputs: everything ``build`` is given: config views (``ml_collections.ConfigDict``), plain values
                and containers of them, dataclasses and NamedTuples of them, a ``jax.sharding.Mesh``, and the
                ``Part`` s it is built on.

        Returns:
            The ``Part``; ``.value`` is what ``build`` returned.

        Raises:
            TypeError: an input that cannot be keyed (see ``_canonical``).
        """
        key = json.dumps([name, [_canonical(x) for x in inputs]], sort_keys=True)
        if key not in self._parts:
            value = build(*(x.value if isinstance(x, Part) else x for x in inputs))
            self._parts[key] = Part(name, key, value)
            self.builds[name] += 1
        return self._parts[key]

    def __len__(self) -> int:
        return len(self._parts)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Everything of a run that is compiled, and what it was built from (``compile_run``)."""

    graphdef: Any
    init: Any  # seed -> params
    tx: optax.GradientTransformation
    objective: objective_lib.Objective
    train_step: Any
    eval_step: Any
    score_step: Any  # eval_step with the VLB's times spread evenly over the batch (vdm.image_bpd)
    sampling: Sampling
    solve_progress: evaluation.SolveProgress  # told the ODE solver's t inside eval_step (progress in a batch)


# --------------------------------------------------------------------------------------
# What each builder is given: a config of only the fields it reads
# --------------------------------------------------------------------------------------


def _view(config, **fields: tuple[str, ...] | None) -> ml_collections.ConfigDict:
    """A config of copies of ``config``'s sections (``section=None``) or of some fields of them
    (``section=(field, ...)``): all a builder may read, and all its part is keyed on."""
    resolved = config.copy_and_resolve_references()
    return ml_collections.ConfigDict({
        section: resolved[section] if names is None else {name: copy.deepcopy(resolved[section][name]) for name in names}
        for section, names in fields.items()})


def optimizer_view(config) -> ml_collections.ConfigDict:
    """What ``vdm.optimizer.make_optimizer`` reads: config.train's optimizer and learning-rate fields.

    ``train.num_steps`` sets the length of the learning rate's decay; a constant learning rate has none, so
    there its view holds 0 (the schedule is given a decay of one step, which it does not read) and runs of
    any length share one optimizer and train step.
    """
    view = _view(config, train=("lr", "lr_schedule", "warmup_steps", "num_steps", "b1", "b2", "eps", "weight_decay",
                                "grad_clip"))
    if view.train.lr_schedule == "constant":
        view.train.num_steps = 0
    return view


def objective_view(config) -> ml_collections.ConfigDict:
    """What ``vdm.objective.Objective.from_config`` reads: the loss section and four model fields."""
    return _view(config, loss=None, model=("gamma_min", "gamma_max", "prediction", "mean_encoder"))


# --------------------------------------------------------------------------------------
# The builders
# --------------------------------------------------------------------------------------


def _model(model_config, info):
    return steps.model_initializer(model_config, info)  # (graphdef, init, decay_mask)


def _optimizer(model, optimizer_config) -> optax.GradientTransformation:
    return optimizer.make_optimizer(optimizer_config, model[2])


def _train_step(model, tx, objective, ema_decay, limits, mesh):
    replicated = parallel.replicated(mesh)
    return jax.jit(steps.make_train_step(model[0], tx, objective, ema_decay, limits),
                   in_shardings=(replicated, parallel.batch_sharded(mesh, batch_axis=1)),  # [k, B, ...]
                   out_shardings=(replicated, replicated), donate_argnums=0)


def _eval_steps(model, eval_config, mesh):
    """(eval_step, score_step, their SolveProgress): the eval step's settings are the whole eval section."""
    replicated, batch = parallel.replicated(mesh), parallel.batch_sharded(mesh)  # [B, ...]
    solve_progress = evaluation.SolveProgress()
    eval_step, score_step = (jax.jit(evaluation.make_eval_step(model[0], eval_config, solve_progress, time_sampler),
                                     in_shardings=(replicated, batch, batch, replicated), out_shardings=replicated)
                             for time_sampler in ("iid", "low_discrepancy"))
    return eval_step, score_step, solve_progress


def _sampling(model, num_images, num_steps, sampler, guidance, sampler_kwargs) -> Sampling:
    graphdef = model[0]

    def generation(params, rng, labels):
        return model_lib.generation(nnx.merge(graphdef, params), rng, num_images, num_steps=num_steps,
                                    sampler=sampler, labels=labels, guidance=guidance,
                                    sampler_kwargs=copy.deepcopy(sampler_kwargs))

    return Sampling(generation)


def compile_run(config, info, mesh, cache: CompileCache | None = None) -> Compiled:
    """The jitted functions of a run, each taken from ``cache`` when it holds one built from the same inputs.

    Args:
        config: the run's (validated) config.
        info: the data's ``vdm.data.DatasetInfo``.
        mesh: the data mesh (``vdm.parallel.make_data_mesh``).
        cache: where the parts are kept and found; None: a new one (nothing is reused).

    Returns:
        The run's ``Compiled`` functions (jitted lazily: each compiles on its first call).
    """
    cache = CompileCache() if cache is None else cache
    model = cache.part("model", _model, _view(config, model=None), info)
    tx = cache.part("optimizer", _optimizer, model, optimizer_view(config))
    objective = cache.part("objective", objective_lib.Objective.from_config, objective_view(config))
    train_step = cache.part("train_step", _train_step, model, tx, objective, config.train.ema_decay,
                            health.Limits.from_config(config.train), mesh)
    eval_steps = cache.part("eval_steps", _eval_steps, model, _view(config, eval=None), mesh)
    c = config.sample
    sampling = cache.part("sampling", _sampling, model, c.num_images, c.steps, c.sampler, c.guidance,
                          c.sampler_kwargs.to_dict())
    graphdef, init, _ = model.value
    eval_step, score_step, solve_progress = eval_steps.value
    return Compiled(graphdef, init, tx.value, objective.value, train_step.value, eval_step, score_step,
                    sampling.value, solve_progress)
