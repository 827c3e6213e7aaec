"""Resuming a run from its checkpoints: what a checkpoint records of its run (``meta``), whether a
config and data set may resume it (``check_compatible``), which checkpoints are healthy
(``HealthRecord``), and restoring the one a run resumes from (``restore_newest``).

Healthy checkpoints: a checkpoint's state is only tested when training goes on from it (the loss of
step k + 1 is the first figure computed from the parameters saved at step k). So a checkpoint counts
as healthy once a later health check (``vdm.health``, at each log step and save) has passed with
the newest step healthy; the newest such checkpoint is kept out of the rotation of
``train.keep_checkpoints``. When a run stops on an unhealthy step, the record says so, and the next
run resumes from the last healthy checkpoint: the later ones are moved aside to ``<step>.unhealthy``
(never deleted), with one note. ``--mode eval`` and ``sample`` then read the last healthy one and
move nothing.

A checkpoint may be resumed with another config as long as the model and the data are the same:
every ``model.*`` field but ``_COMPATIBLE_MODEL_FIELDS`` (which change no parameter), and the
data set's name, shape, levels and classes. Everything else (optimizer, steps, sampling,
evaluation, the device count) may change between runs.
"""
from __future__ import annotations

import dataclasses
import json

import jax

from vdm import checkpoint as ckpt_lib, configlib, data as data_lib, paths

# The health record's file, in the checkpoint directory beside the steps (Orbax lists only numbered steps).
HEALTH_FILE = "health.json"

# Model fields that change no parameter: a checkpoint may be resumed with other values.
_COMPATIBLE_MODEL_FIELDS = frozenset({"dtype", "remat", "convolution_gradient", "weight_gradient"})


def _data_identity(info: data_lib.DatasetInfo) -> dict:
    return {"name": info.name, "shape": list(info.shape), "vocab_size": info.vocab_size,
            "num_classes": info.num_classes}


def _model_differences(meta: dict, config: dict, data_identity: dict) -> list[str]:
    """``field: checkpoint A, config B`` for each model field and data property that differs."""
    # A field the checkpoint's config does not have (it was added to the library after the save) had its default.
    # A checkpoint saved before a field was renamed (configlib.RENAMED) names it by its old name.
    defaults = configlib.flatten(configlib.base_config().model.to_dict(), "model")
    stored = configlib.upgrade_stored(meta["config"])
    saved = {k: v for k, v in (defaults | configlib.flatten(stored.get("model", {}), "model")).items()
             if k.split(".")[1] not in _COMPATIBLE_MODEL_FIELDS}
    now = {k: v for k, v in configlib.flatten(config.get("model", {}), "model").items()
           if k.split(".")[1] not in _COMPATIBLE_MODEL_FIELDS}
    saved |= configlib.flatten(meta.get("data", {}), "data")
    now |= configlib.flatten(data_identity, "data")
    missing = object()
    return [f"{k}: checkpoint {saved.get(k, 'unset')!r}, config {now.get(k, 'unset')!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k, missing) != now.get(k, missing)]


def meta(config, info: data_lib.DatasetInfo) -> dict:
    """What a checkpoint records of the run besides the state: config, data, devices."""
    return {"config": json.loads(config.to_json_best_effort()), "data": _data_identity(info),
            "devices": jax.device_count(), "processes": jax.process_count()}


def check_compatible(checkpointer: ckpt_lib.Checkpointer, config, info: data_lib.DatasetInfo) -> None:
    """CheckpointError naming the fields that differ, if the newest checkpoint is of another model or data."""
    for step in reversed(checkpointer.all_steps()):
        saved = checkpointer.step_metadata(step)
        if "config" not in saved:
            continue  # unreadable: restoring it will say so (and fall back)
        differences = _model_differences(saved, json.loads(config.to_json_best_effort()), _data_identity(info))
        if differences:
            shown = "; ".join(differences[:4]) + (f" (+{len(differences) - 4} more)" if len(differences) > 4 else "")
            raise ckpt_lib.CheckpointError(
                f"checkpoint step {step} in {checkpointer.directory} is of another model or data: {shown}; "
                "use another --workdir, or the checkpoint's config")
        return


def check_required(config, directory: str) -> None:
    """The checkpoint a second stage starts from, checked before anything is written.

    A run that continues another (``configs/mnist_idode_finetune.py`` continues ``mnist_idode``'s) names it in
    ``train.continues``; in a workdir without a checkpoint it would train from scratch, silently.

    Args:
        config: the run's config.
        directory: the workdir's checkpoint directory (only read).

    Raises:
        CheckpointError: one line naming the directory and the run it should hold, when ``train.continues`` is
            set and ``directory`` holds no finished checkpoint.
    """
    first = config.train.continues
    if first and not ckpt_lib.finished_steps(directory):
        raise ckpt_lib.CheckpointError(
            f"no checkpoint in {directory}: this config continues a run of {first} (train.continues), and "
            f"without one it would start from scratch; train {first} in this workdir first, or copy its workdir here")


@dataclasses.dataclass
class HealthRecord:
    """``healthy``: the newest checkpoint known to be healthy (None: none yet); ``stopped_at``: the
    unhealthy step a run stopped at, when the last run ended so (None otherwise)."""

    healthy: int | None = None
    stopped_at: int | None = None

    @classmethod
    def read(cls, checkpointer: ckpt_lib.Checkpointer) -> "HealthRecord":
        """The record of ``checkpointer``'s directory (an empty one where there is none, or it is unreadable:
        then every checkpoint is treated as before, the newest intact one resumed)."""
        try:
            saved = json.loads(paths.path(paths.join(checkpointer.directory, HEALTH_FILE)).read_text())
            return cls(**{k: None if saved.get(k) is None else int(saved[k]) for k in ("healthy", "stopped_at")})
        except (OSError, ValueError, TypeError, AttributeError):
            return cls()

    def write(self, checkpointer: ckpt_lib.Checkpointer) -> None:
        """Save the record (process 0; atomically) and keep its healthy step out of the rotation."""
        checkpointer.protect(self.healthy)
        if jax.process_index() == 0:
            paths.write_bytes(paths.join(checkpointer.directory, HEALTH_FILE),
                              json.dumps(dataclasses.asdict(self)).encode())

    def confirm(self, checkpointer: ckpt_lib.Checkpointer, step: int) -> None:
        """Training has passed a health check at ``step`` with that step healthy: the newest checkpoint
        before it is healthy."""
        before = [s for s in checkpointer.all_steps() if s < step]
        if before and before[-1] != self.healthy:
            self.healthy = before[-1]
            self.write(checkpointer)

    def stopped(self, checkpointer: ckpt_lib.Checkpointer, step: int) -> None:
        """Training stopped on an unhealthy step (``step``: the newest step taken): a rerun resumes from
        ``healthy``."""
        self.stopped_at = step
        self.write(checkpointer)


def _set_aside_unhealthy(checkpointer: ckpt_lib.Checkpointer, record: HealthRecord, read_only: bool) -> list[str]:
    """After a stop on an unhealthy step: move the checkpoints after the last healthy one aside (with
    ``read_only``, leave them), one note."""
    resume_from = record.healthy or 0
    later = [s for s in checkpointer.all_steps() if s > resume_from]
    where = f"step {resume_from}, the last healthy checkpoint" if record.healthy is not None else \
        "step 0 (no checkpoint was known to be healthy)"
    said = f"the last run stopped on an unhealthy step (at step {record.stopped_at})"
    if read_only:
        return [f"{said}: used {where}" + (f"; steps {', '.join(map(str, later))} left in place" if later else "")]
    moved = checkpointer.move_aside(later, "unhealthy")
    record.stopped_at = None
    record.write(checkpointer)
    return [f"{said}: resumed from {where}" + (f"; moved steps {', '.join(map(str, later))} aside to {', '.join(moved)}"
                                               if moved else "")]


def restore_newest(checkpointer: ckpt_lib.Checkpointer, state, read_only: bool = False):
    """(state, notes, record): the checkpoint a run resumes from (the newest intact one, or after a stop on
    an unhealthy step the last healthy one, ``HealthRecord``) restored onto ``state``'s structure and
    shardings, or ``state`` itself if there is none. Damaged newer ones are moved aside (left in place
    with ``read_only``), each with a note, and a note says when the checkpoint was written on another
    number of devices. Without ``read_only`` (training, which holds the workdir's lock) the directories of
    saves that never finished are removed first, each with a note (``Checkpointer.remove_unfinished``)."""
    record = HealthRecord.read(checkpointer)
    checkpointer.protect(record.healthy)
    upto, notes = None, [] if read_only else checkpointer.remove_unfinished()
    if record.stopped_at is not None:
        upto = record.healthy or 0
        notes += _set_aside_unhealthy(checkpointer, record, read_only)
    step, restored, damaged = checkpointer.restore_newest_good(ckpt_lib.abstract_like(state), read_only, upto)
    notes += damaged
    if step is None:
        return state, notes, record
    devices = checkpointer.step_metadata(step).get("devices")
    if devices is not None and devices != jax.device_count():
        notes.append(f"checkpoint step {step} was written on {devices} device(s); continuing on "
                     f"{jax.device_count()} (the batches are a function of seed and step: the same data)")
    return restored, notes, record
