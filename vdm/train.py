"""Training, evaluation and sampling: one flat trainer that reads top to bottom.

``train_and_evaluate(config, workdir)`` is the whole program behind
``python -m vdm.main --mode train`` and the entry point from Python (a notebook: config in,
metrics out); ``evaluate_checkpoint`` and ``sample_checkpoint`` are the ``eval`` and
``sample`` modes. Everything random is a function of (config.seed, step), and the data order
is a function of (seed, step), so a run resumed from a checkpoint continues exactly as the
uninterrupted run would have.

This file is the program; each piece it runs lives in a module of its own:

* ``vdm.trainer``: the ``Trainer`` (a run's data, compiled functions, state and checkpoints) and the checks of a
  config and its data before anything is compiled (``resolve_config``, ``prepare``), re-exported here.

* ``vdm.steps``: the ``TrainState``, the model's parameters and the train step (the objective
  itself: ``vdm.objective.loss_and_grads``); ``vdm.optimizer``: AdamW and the
  learning rate; ``vdm.evaluation``: the eval step and the pass over the test split;
  ``vdm.sampling``: the sampler run in chunks; ``vdm.compilation``: all of these compiled (and kept in a
  ``CompileCache`` a caller may give several runs: ``compile_cache=``), and XLA's persistent cache.
* ``vdm.health``: non-finite and diverged steps (``NonFiniteError``); ``vdm.signals``: SIGINT / SIGTERM
  (``Interrupted``); ``vdm.lock``: one training run per workdir; ``vdm.resume``: which
  checkpoint a run may resume, and which are healthy; ``vdm.pictures`` and ``vdm.quality``: the samples' files and figures.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

from vdm import checkpoint as ckpt_lib, compilation, data as data_lib, metrics as metrics_lib
from vdm.signals import Signals
from vdm.trainer import Trainer, prepare, resolve_config, write_config  # noqa: F401  (part of vdm.train's API)

# --------------------------------------------------------------------------------------
# Training: the loop
# --------------------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str, overrides: Mapping[str, Any] | None = None, *,
                       stop_within_s: float | None = None, compile_cache: compilation.CompileCache | None = None) -> dict:
    """Train (resuming from the newest intact checkpoint in workdir), evaluate, sample; the final metrics.

    ``config``: a ConfigDict or the name of a shipped config or file, ``overrides`` set on a copy
    (``resolve_config``). Returns the test bits/dim (``bpd``, ``bpd_se`` and the VLB's terms, or
    ``bpd_ode``, by ``config.eval.method``), ``count`` (test images), ``samples`` (the PNG of the
    samples; the ``.npz`` beside it holds them), ``nfe``, ``step``, and ``fd_mnist`` where the config
    asks for it; ``{"step", "stopped": True}`` when SIGINT / SIGTERM stopped the run (saved).
    ``stop_within_s``: end the process when a signal cannot be taken within that time (``vdm.signals``;
    the command line's choice). ``compile_cache``: as in ``Trainer`` (one given to several calls is shared).
    """
    config = resolve_config(config, overrides)
    trainer = Trainer(config, workdir, exclusive=True, compile_cache=compile_cache)  # all checked before compiling
    try:
        start = trainer.restore_latest()
        write_config(config, workdir)  # only once the run is accepted
        writer = metrics_lib.MetricWriter(workdir)
        progress = metrics_lib.Progress(config.train.num_steps, initial_step=start, log_every=config.train.log_every)
        try:
            for line in trainer.startup_lines() + trainer.restore_notes + writer.notes:
                progress.log(line)
            if start:
                progress.log(f"resumed from step {start} in {workdir}")
            with Signals(stop_within_s) as signals:
                return _train_loop(trainer, writer, progress, start, signals)
        finally:
            progress.close()
            writer.close()
    finally:
        trainer.close(quiet=sys.exc_info()[0] is not None)


def _train_loop(trainer: Trainer, writer, progress, start: int, signals: Signals) -> dict:
    opt = trainer.config.train
    last_time, last_step = time.perf_counter(), start
    batches = trainer.train_batches(start)
    signals.deferring = True  # SIGINT / SIGTERM: finish the step, save, stop
    step = start
    while step < opt.num_steps:
        trainer.state, logged = trainer.train_step(trainer.state, next(batches))
        step += opt.steps_per_call
        if step % opt.log_every == 0 or step >= opt.num_steps:
            trainer.check_health()
            logged = {k: float(v) for k, v in jax.device_get(logged).items()}
            now = time.perf_counter()
            rate = (step - last_step) / max(now - last_time, 1e-9)
            last_time, last_step = now, step
            logged.update(steps_per_sec=rate, images_per_sec=rate * opt.batch_size)
            writer.write(step, logged)
            progress.update(step, loss=logged["loss"], bpd=logged["bpd"])
        if step % opt.eval_every == 0 and step < opt.num_steps:
            result = trainer.evaluate(stop=lambda: signals.requested)
            if result is not None:  # None: a signal came during the evaluation
                writer.write(step, {f"eval_{k}": v for k, v in result.items()})
                bounds = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if f"{k}_se" in result)
                progress.log(f"step {step}: test {bounds}")
        if step % opt.checkpoint_every == 0 or step >= opt.num_steps or signals.requested:
            trainer.save()
        if signals.requested:
            progress.log(f"{signals.requested}: saved step {step}, exiting")
            break
    trainer.checkpointer.wait()
    signals.deferring = False  # from here on a signal stops at once: the final state is saved
    if signals.requested:
        return {"step": step, "stopped": True}
    result = trainer.evaluate()
    step = int(trainer.state.step)
    writer.write(step, {f"eval_{k}": v for k, v in result.items()})
    progress.close()  # end the training bar's line before the sampler's
    return result | trainer.sample(step, writer, show_progress=True) | {"step": step}


# --------------------------------------------------------------------------------------
# Evaluation and sampling of a checkpoint
# --------------------------------------------------------------------------------------


def restored_trainer(config, workdir: str, check_data: Callable[[data_lib.DatasetInfo], None] | None = None,
                     compile_cache: compilation.CompileCache | None = None, writes: bool = False) -> Trainer:
    """The Trainer of ``workdir``'s latest checkpoint, read only (``--mode eval``, ``sample``, ``score``);
    ``check_data``, ``compile_cache`` and ``writes`` as in ``Trainer``."""
    trainer = Trainer(config, workdir, must_exist=True, check_data=check_data, compile_cache=compile_cache,
                      writes=writes)
    try:
        if trainer.restore_latest(read_only=True) == 0 and trainer.checkpointer.latest_step() is None:
            raise ckpt_lib.CheckpointError(f"no checkpoint in {trainer.checkpointer.directory}: train first")
    except BaseException:
        trainer.close()
        raise
    for note in trainer.restore_notes:
        print(f"note: {note}", file=sys.stderr)
    return trainer


def evaluate_checkpoint(config, workdir: str, overrides: Mapping[str, Any] | None = None, *,
                        stop_within_s: float | None = None, compile_cache: compilation.CompileCache | None = None) -> dict:
    """--mode eval: test bits/dim of the latest checkpoint (EMA parameters); arguments as in ``train_and_evaluate``."""
    trainer = restored_trainer(resolve_config(config, overrides), workdir, compile_cache=compile_cache)
    try:
        with Signals(stop_within_s):
            return trainer.evaluate(show_progress=True) | {"step": int(trainer.state.step)}
    finally:
        trainer.close()


def sample_checkpoint(config, workdir: str, overrides: Mapping[str, Any] | None = None, *,
                      stop_within_s: float | None = None, compile_cache: compilation.CompileCache | None = None) -> dict:
    """--mode sample: samples (.npz, .png, TensorBoard) from the latest checkpoint; arguments as in
    ``train_and_evaluate``."""
    trainer = restored_trainer(resolve_config(config, overrides), workdir, compile_cache=compile_cache, writes=True)
    step = int(trainer.state.step)
    try:
        with Signals(stop_within_s), metrics_lib.MetricWriter(workdir) as writer:
            return trainer.sample(step, writer, show_progress=True) | {"step": step}
    finally:
        trainer.close()
