"""Compiling a run: XLA's persistent cache across processes, and the compiled functions of a config
kept within one process.

``use_compilation_cache`` points JAX's persistent cache at a directory (``train.compilation_cache_dir``),
so that a second process running the same config skips XLA compilation. ``compile_run`` builds the
jitted train step, eval step and sampler of a config once per process: a notebook's second run of
the same config (or one differing only in ``_NOT_COMPILED`` fields) reuses them, traces and all.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import optax
from flax import nnx

from vdm import evaluation, health, model as model_lib, objective as objective_lib, optimizer, parallel, steps
from vdm.sampling import Sampling


def use_compilation_cache(directory: str) -> str | None:
    """Keep XLA's compiled programs in ``directory`` across processes (JAX's persistent cache).

    ``"auto"``: ``$XDG_CACHE_HOME/vdm/jax`` (default ``~/.cache/vdm/jax``); ``""``: off.
    A second run of the same config then skips XLA compilation. Returns the directory used.
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
class Compiled:
    """Everything of a run that is compiled, and what it was built from; kept between runs of one config in one process."""

    graphdef: Any
    init: Any  # seed -> params
    tx: optax.GradientTransformation
    objective: objective_lib.Objective
    train_step: Any
    eval_step: Any
    score_step: Any  # eval_step with the VLB's times spread evenly over the batch (vdm.scoring)
    sampling: Sampling
    solve_progress: evaluation.SolveProgress  # told the ODE solver's t inside eval_step (progress in a batch)


# The one per-process cache of compiled functions (compile key -> Compiled): what makes a notebook's
# second run of a config start at once. Tests that change what a step computes empty it.
_COMPILED: dict[str, Compiled] = {}

# Config fields that change no compiled function: runs that differ only in these share them.
_NOT_COMPILED = {"seed": (), "data": (), "train": ("num_steps", "log_every", "eval_every", "checkpoint_every",
                                                   "keep_checkpoints", "coordinator_timeout_s",
                                                   "compilation_cache_dir", "skip_nonfinite"),
                 "eval": ("inception_weights", "num_examples", "score_draws")}


def _compile_key(config, info, mesh) -> str:
    """What the compiled functions depend on: the config less ``_NOT_COMPILED``, the data's shape, the mesh."""
    c = json.loads(config.to_json_best_effort(sort_keys=True))
    num_steps = c["train"]["num_steps"]
    for section, fields in _NOT_COMPILED.items():
        if not fields:
            c.pop(section, None)
        for key in fields:
            c[section].pop(key, None)
    if c["train"]["lr_schedule"] != "constant":
        c["train"]["num_steps"] = num_steps  # the decay's length is compiled in
    devices = [d.id for d in mesh.devices.flat]
    return json.dumps([c, dataclasses.astuple(info)[1:], devices], sort_keys=True, default=str)


def compile_run(config, info, mesh) -> Compiled:
    """The jitted functions of a run (cached per process: a notebook's second run of a config reuses them)."""
    key = _compile_key(config, info, mesh)
    if key in _COMPILED:
        return _COMPILED[key]
    graphdef, init, decay_mask = steps.model_initializer(config, info)
    tx = optimizer.make_optimizer(config, decay_mask)
    objective = objective_lib.Objective.from_config(config)
    replicated = parallel.replicated(mesh)
    steps_batch = parallel.batch_sharded(mesh, batch_axis=1)  # [k, B, ...]
    batch = parallel.batch_sharded(mesh)  # [B, ...]
    train_step = jax.jit(steps.make_train_step(graphdef, tx, objective, config.train.ema_decay,
                                                 health.Limits.from_config(config.train)),
                         in_shardings=(replicated, steps_batch), out_shardings=(replicated, replicated),
                         donate_argnums=0)
    solve_progress = evaluation.SolveProgress()
    eval_step, score_step = (jax.jit(evaluation.make_eval_step(graphdef, config, solve_progress, time_sampler),
                                     in_shardings=(replicated, batch, batch, replicated), out_shardings=replicated)
                             for time_sampler in ("iid", "low_discrepancy"))
    c = config.sample

    def generation(params, rng, labels):
        return model_lib.generation(nnx.merge(graphdef, params), rng, c.num_images, num_steps=c.num_steps,
                                    sampler=c.sampler, labels=labels, guidance=c.guidance,
                                    sampler_kwargs=c.sampler_kwargs.to_dict())

    _COMPILED[key] = Compiled(graphdef, init, tx, objective, train_step, eval_step, score_step, Sampling(generation),
                              solve_progress)
    return _COMPILED[key]
