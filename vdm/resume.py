"""Resuming a run from its checkpoints: what a checkpoint records of its run (``meta``), whether a
config and data set may resume it (``check_compatible``), and restoring the newest intact one
(``restore_newest``).

A checkpoint may be resumed with another config as long as the model and the data are the same:
every ``model.*`` field but ``_COMPATIBLE_MODEL_FIELDS`` (which change no parameter), and the
data set's name, shape, levels and classes. Everything else (optimizer, steps, sampling,
evaluation, the device count) may change between runs.
"""
from __future__ import annotations

import json

import jax

from vdm import checkpoint as ckpt_lib, configlib, data as data_lib

# Model fields that change no parameter: a checkpoint may be resumed with other values.
_COMPATIBLE_MODEL_FIELDS = {"dtype", "remat", "convolution_gradient", "weight_gradient"}


def _data_identity(info: data_lib.DatasetInfo) -> dict:
    return {"name": info.name, "shape": list(info.shape), "vocab_size": info.vocab_size,
            "num_classes": info.num_classes}


def _model_differences(meta: dict, config: dict, data_identity: dict) -> list[str]:
    """``field: checkpoint A, config B`` for each model field and data property that differs."""
    saved = {k: v for k, v in configlib.flatten(meta["config"].get("model", {}), "model").items()
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


def restore_newest(checkpointer: ckpt_lib.Checkpointer, state, read_only: bool = False):
    """(state, notes): the newest intact checkpoint restored onto ``state``'s structure and shardings,
    or ``state`` itself if there is none. Damaged newer ones are moved aside (left in place with
    ``read_only``), each with a note, and a note says when the checkpoint was written on another
    number of devices."""
    step, restored, notes = checkpointer.restore_newest_good(ckpt_lib.abstract_like(state), read_only)
    if step is None:
        return state, notes
    devices = checkpointer.step_metadata(step).get("devices")
    if devices is not None and devices != jax.device_count():
        notes.append(f"checkpoint step {step} was written on {devices} device(s); continuing on "
                     f"{jax.device_count()} (the batches are a function of seed and step: the same data)")
    return restored, notes
