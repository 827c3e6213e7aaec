"""A run of the trainer: its config checked before compiling, its data, compiled functions, state and checkpoints.

``Trainer`` is what ``vdm.train``'s programs (``train_and_evaluate``, ``evaluate_checkpoint``,
``sample_checkpoint``, ``vdm.image_bpd``) hold while they run; ``resolve_config`` and ``prepare`` check a config
and its data before anything is compiled or written. ``vdm.train`` re-exports all of them.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from vdm import (checkpoint as ckpt_lib, compilation, configlib, configs, data as data_lib, evaluation, health,
                 inception, lock as lock_lib, metrics as metrics_lib, model as model_lib, parallel, paths, pictures,
                 quality, resume, steps)

# --------------------------------------------------------------------------------------
# The config, and everything checked before compiling
# --------------------------------------------------------------------------------------


def resolve_config(config, overrides: Mapping[str, Any] | None = None):
    """The ConfigDict of ``config``: a ConfigDict, or a shipped config's name (``"mnist"``) or a config
    file (``vdm.configs.get``), with ``overrides`` (``{"train.num_steps": 500}``) set on a copy as
    ``--config.train.num_steps=500`` would set them (``configlib.override``; its notes are printed)."""
    if isinstance(config, str):
        config = configs.get(config)
    config, notes = configlib.override(config, overrides or {})
    for note in notes:
        print(note, file=sys.stderr)
    return config


def write_config(config, workdir: str) -> None:
    """``workdir/config.json``: the resolved config (process 0 only)."""
    if jax.process_index() == 0:
        paths.write_bytes(paths.join(workdir, "config.json"), config.to_json_best_effort(indent=2, sort_keys=True).encode())


def prepare(config) -> tuple[Any, data_lib.Dataset]:
    """Everything a run checks before compiling: the config, the processes, the mesh, the data.

    Raises ConfigError / DataError / DistributedError with one line on bad input.
    """
    configlib.validate(config)
    parallel.maybe_initialize_distributed(timeout_s=config.train.coordinator_timeout_s)
    mesh = parallel.make_data_mesh()
    try:
        parallel.check_batch_divisible(config.train.batch_size, mesh)
    except ValueError as e:
        raise configlib.ConfigError(str(e)) from None
    dataset = data_lib.load_dataset(config.data.source, **dict(config.data.kwargs))
    configlib.validate_against_data(config, dataset.info)
    return mesh, dataset


# --------------------------------------------------------------------------------------
# A run: its data, compiled functions, state and checkpoints
# --------------------------------------------------------------------------------------


class Trainer:
    """Holds the compiled functions, the mesh, the data and the state for one workdir.

    ``exclusive``: hold the workdir's lock (a training run); ``must_exist``: the workdir must
    already have checkpoints (eval and sample: a mistyped workdir is an error, not a new one);
    ``check_data``: called with the data's ``DatasetInfo`` once config and data are checked.
    ``compile_cache``: where compiled functions are found and kept (``vdm.compilation.CompileCache``; give two
    runs one and the second reuses what it can; default: a new one for this Trainer). ``writes``: the caller
    writes its results into the workdir (--mode score, sample), which is checked writable, as a training run's
    lock checks it, before anything is compiled.
    Everything that can be wrong with the input (config, data, the lock, a checkpoint from
    another model) is found before anything is compiled.
    """

    def __init__(self, config, workdir: str, *, exclusive: bool = False, must_exist: bool = False,
                 check_data: Callable[[data_lib.DatasetInfo], None] | None = None,
                 compile_cache: compilation.CompileCache | None = None, writes: bool = False):
        self.config, self.workdir = config, workdir
        lock_lib.check_workdir(workdir)
        self.mesh, self.dataset = prepare(config)
        info = self.dataset.info
        if check_data is not None:  # the caller's own input, checked against the data (--mode score's images)
            check_data(info)
        # FID's network: read and checked now, so that a bad file is found before anything is compiled.
        self.inception_weights = inception.load_weights(config.eval.inception_weights) if config.eval.inception_weights \
            else None
        checkpoints = paths.join(workdir, "checkpoints")
        if must_exist and not paths.path(checkpoints).is_dir():
            raise ckpt_lib.CheckpointError(f"no checkpoint in {checkpoints}: train first (is --workdir right?)")
        resume.check_required(config, checkpoints)  # a second stage: its first stage's checkpoint (train.continues)
        self.lock = lock_lib.WorkdirLock(workdir)
        if exclusive:
            lock_lib.acquire_everywhere(self.lock)
        elif writes:
            self.lock.check_writable()
        try:
            self.checkpointer = ckpt_lib.Checkpointer(checkpoints, max_to_keep=config.train.keep_checkpoints)
            resume.check_compatible(self.checkpointer, config, info)
        except BaseException:
            self.lock.release()
            raise
        self.restore_notes: list[str] = []
        self.health_record = resume.HealthRecord()
        self.xla_cache_dir = compilation.use_compilation_cache(config.train.compilation_cache_dir)
        self.compile_cache = compilation.CompileCache() if compile_cache is None else compile_cache
        compiled = compilation.compile_run(config, info, self.mesh, self.compile_cache)
        self.graphdef, self.tx, self.objective = compiled.graphdef, compiled.tx, compiled.objective
        self.train_step, self.eval_step, self.sampling = compiled.train_step, compiled.eval_step, compiled.sampling
        self.score_step = compiled.score_step
        self.solve_progress = compiled.solve_progress
        params = compiled.init(config.seed)
        self.state = parallel.replicate(steps.initial_state(config.seed, params, self.tx, self.objective), self.mesh)

    def close(self, quiet: bool = False) -> None:
        """Wait for pending saves, release Orbax and the workdir lock.

        ``quiet``: an error is already on its way out; a failing save (say, a full disk) is not
        reported a second time over it.
        """
        try:
            self.checkpointer.close()
        except ckpt_lib.CheckpointError:
            if not quiet:
                raise
        finally:
            self.lock.release()

    def startup_lines(self) -> list[str]:
        """What this run sees: software, processes, devices, mesh, batch, precision, size, workdir."""
        opt, devices = self.config.train, jax.devices()
        num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.state.params))
        info = self.dataset.info
        return [
            f"vdm: jax {jax.__version__}, backend {jax.default_backend()} ({devices[0].device_kind}); "
            f"process {jax.process_index()} of {jax.process_count()}; "
            f"devices {jax.local_device_count()} local, {jax.device_count()} global",
            f"mesh {dict(self.mesh.shape)}; batch {opt.batch_size} global = "
            f"{opt.batch_size // jax.process_count()} per process = {opt.batch_size // self.mesh.size} per device; "
            f"{opt.steps_per_call} step(s) per call; compute {self.config.model.dtype}"
            f"{', remat' if self.config.model.remat else ''}",
            f"model: {num_params:,} parameters ({self.config.model.network}, {self.config.model.schedule} schedule); "
            f"data: {info.name} {info.shape} x {info.num_train} train / {info.num_test} test",
            f"workdir: {self.workdir}",
        ]

    # -- data ---------------------------------------------------------------------------

    def _to_devices(self, rows: list[dict]) -> dict:
        """This host's rows of k steps -> the global batch {"image": [k, B, ...], "label": [k, B]}, sharded."""
        return parallel.host_batch_to_global(self.mesh, {k: np.stack([r[k] for r in rows]) for k in rows[0]},
                                             batch_axis=1)

    def _hosts(self) -> dict:
        return {"process_index": jax.process_index(), "process_count": jax.process_count()}

    def train_batch(self, step: int) -> dict:
        """The global batch for steps step .. step + k - 1 (k = steps_per_call), by random access."""
        opt = self.config.train
        return self._to_devices([data_lib.train_batch(self.dataset.train, opt.batch_size, seed=self.config.seed,
                                                      step=step + i, **self._hosts())
                                 for i in range(opt.steps_per_call)])

    def train_batches(self, start_step: int):
        """The global batches from ``start_step`` on, k steps at a time, from the prefetching pipeline."""
        opt = self.config.train
        rows = data_lib.train_batches(self.dataset.train, opt.batch_size, seed=self.config.seed,
                                      start_step=start_step, **self._hosts())
        while True:
            yield self._to_devices([next(rows) for _ in range(opt.steps_per_call)])

    # -- checkpoints --------------------------------------------------------------------

    def restore_latest(self, read_only: bool = False) -> int:
        """Restore the checkpoint to resume: the newest intact one, or after a stop on an unhealthy step the
        last healthy one (``vdm.resume.restore_newest``: what it moves aside, or with ``read_only`` leaves,
        is noted in ``restore_notes``); returns the step (0 if there is none)."""
        self.state, self.restore_notes, self.health_record = resume.restore_newest(self.checkpointer, self.state,
                                                                                   read_only)
        return int(self.state.step)

    def check_health(self) -> int:
        """Raise NonFiniteError if training went non-finite or diverged (``vdm.health.check_health``), and
        record the stop, so that a rerun resumes from the last healthy checkpoint; else the newest
        checkpoint before this step is healthy (``vdm.resume.HealthRecord``). Returns the step checked."""
        step = int(self.state.step)
        try:
            newest_healthy = health.check_health(self.state.health, self.config.train.skip_nonfinite,
                                                 self.health_record.healthy)
        except health.NonFiniteError:
            self.health_record.stopped(self.checkpointer, step)
            raise
        if newest_healthy:
            self.health_record.confirm(self.checkpointer, step)
        return step

    def save(self) -> None:
        """Checkpoint the state, after checking that nothing in it came from an unhealthy step."""
        step = self.check_health()
        if self.checkpointer.latest_step() != step:
            self.checkpointer.save(step, self.state, meta=resume.meta(self.config, self.dataset.info))

    # -- evaluation and sampling ----------------------------------------------------------

    def evaluate(self, params=None, stop=None, show_progress: bool = False, per_example: bool = False) -> dict | None:
        """Test bits/dim of ``params`` (default: the EMA parameters) over the test split, by
        ``config.eval.method``, with standard errors; None if ``stop()`` ended the pass
        (``vdm.evaluation.evaluate``, which says what each argument does)."""
        params = self.state.ema_params if params is None else params
        return evaluation.evaluate(self.eval_step, params, self.dataset.test, self.mesh, self.config, stop=stop,
                                   show_progress=show_progress, per_example=per_example,
                                   solve_progress=self.solve_progress)

    def sample_labels(self) -> jax.Array | None:
        """The classes to sample: None for an unconditional model, else config.sample.labels (or an even spread)."""
        c, num_classes = self.config.sample, self.config.model.num_classes
        return model_lib.spread_labels(c.num_images, num_classes, c.labels) if num_classes else None

    def sample(self, step: int, writer: metrics_lib.MetricWriter | None = None, params=None,
               show_progress: bool = False) -> dict:
        """Draw config.sample.num_images samples with the EMA parameters.

        Writes ``samples_<step>.npz`` (``images`` uint8 [N, H, W, C], ``nfe`` and, for a
        conditional model, ``labels``) and ``samples_<step>.png`` (``samples_<step>_2`` and on where
        those exist: nothing earlier is replaced), and the grid to TensorBoard.
        Returns {"samples": the PNG's path, "nfe": network evaluations of the sampler} and the
        sample-quality figures the config asks for (``vdm.quality.sample_quality``).
        The sampler's loop runs in chunks (``vdm.sampling``): a signal stops it within about a second.
        Raises NonFiniteError when a sample's final z (z_0) is not finite (its picture would be black).
        """
        c, info = self.config.sample, self.dataset.info
        params = self.state.ema_params if params is None else params
        labels = self.sample_labels()
        rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 0xA11)
        progress = None
        if show_progress:
            total = self.sampling.num_steps(params, rng, labels)
            progress = metrics_lib.Progress(total, log_every=max(1, total // 10), unit="sampling step")
            progress.log(f"sampling {c.num_images} images: {c.sampler}, {total} steps")
        try:
            images, nfe, non_finite = self.sampling(params, rng, labels,
                                                    None if progress is None else lambda done, _: progress.update(done))
        finally:
            if progress is not None:
                progress.close()
        if int(non_finite):
            raise health.NonFiniteError(f"non-finite samples at step {step}: the sampler's final z (z_0) holds a NaN or "
                                        f"infinity in {int(non_finite)} of {c.num_images} images (nothing was written)")
        images, nfe = np.asarray(images).astype(np.uint8), int(nfe)
        path = pictures.unused_name(paths.join(self.workdir, f"samples_{step}"))
        if jax.process_index() == 0:
            columns = self.config.model.num_classes if labels is not None and not c.labels else None
            grid = pictures.save_samples(path, images, nfe, labels, info.vocab_size, info.kind, columns=columns)
            if writer is not None:
                writer.write_image(step, "samples", grid)
        figures = quality.sample_quality(self.config, images, labels, self.dataset, self.inception_weights, self.workdir)
        if writer is not None and figures:
            writer.write(step, figures)
        return {"samples": path + ".png", "nfe": nfe} | figures
