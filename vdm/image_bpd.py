"""Bits/dim per image, of each image a user brings: ``--mode score`` and ``per_image_bpd``.

    python -m vdm.main --config mnist --workdir workdirs/mnist --mode score --images digits.npz

``images`` is an ``.npz`` file with ``images`` (uint8 ``[N, H, W, C]`` in the model's data format: its
height, width, channels and pixel values ``0 .. vocab_size - 1``; ``[N, H, W]`` for one channel) and, for a
class-conditional model, ``labels`` (``[N]`` integers); or a folder of PNG files (``vdm.data.png``; an
unconditional model only); or, from Python, the arrays themselves. Each image's bound is
``config.eval.method``'s (the VLB, ``bpd``; ``ode`` or ``both`` add the probability-flow ODE's, ``bpd_ode``),
drawn ``config.eval.score_draws`` times (in independent passes, stratified in time within each:
``per_image_bounds``): the row holds their mean and its Monte Carlo standard error. For a conditional model it
bounds -log p(x | y).

The rows go to ``<workdir>/scores_<step>.csv`` (``scores_<step>_2.csv`` and on where that exists: nothing
earlier is replaced): ``image`` (the file name, or the index in the array), ``label`` for a conditional
model, then each bound and its ``_se``. Images of the wrong shape or range are one ``DataError`` line,
found before anything is compiled.

Uses: out-of-distribution detection (in-distribution images take fewer bits/dim; ``auroc``), compression
estimates (bits/dim x dimensions = the lossless code length of that image, to within the bound's gap),
comparing data sets. ``experiments/scoring`` measures the first on the 8x8 digits.

Named for what it computes; ``vdm.scoring`` (``score_images`` for ``per_image_bpd``), its name in 0.2, still
imports for one release, with a ``DeprecationWarning``.
"""
from __future__ import annotations

import csv
import io
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vdm import data as data_lib, evaluation, health, paths, pictures, train
from vdm.data.png import read_png_folder, skipped_note
from vdm.signals import Signals


def read_images(images, info: data_lib.DatasetInfo, num_classes: int) -> tuple[data_lib.ArraySource, list[str]]:
    """(the images as a split, a name per image) from an ``.npz`` path, a folder of PNG files, an array or a
    mapping with ``images`` (and ``labels``), checked against the model's data (``info``) and its classes
    (``num_classes``: 0 for an unconditional model). Raises DataError with one line."""
    if isinstance(images, (str, os.PathLike)):
        path = os.fspath(images)
        if os.path.isdir(path):
            if info.kind != "image":
                raise data_lib.DataError(f"{path}: a folder of PNG files holds images, and this model's data are "
                                         f"{info.kind}; pass an .npz file")
            source, names = read_png_folder(path, channels=info.shape[-1], vocab_size=info.vocab_size)
            if (note := skipped_note(path)) is not None:  # not an error: the CSV names each file it reads
                print(f"note: {note}", file=sys.stderr)
        elif path.endswith(".npz") or os.path.isfile(path):
            source = data_lib.read_npz(path, vocab_size=info.vocab_size)
            names = [str(i) for i in range(len(source))]
        else:
            raise data_lib.DataError(f"{path}: no such file or folder (an .npz file or a folder of PNG files)")
    else:
        arrays = dict(images) if isinstance(images, Mapping) else {"images": images}
        source = data_lib.make_split(arrays["images"], arrays.get("labels"), vocab_size=info.vocab_size,
                                     origin="images")
        names = [str(i) for i in range(len(source))]
    if source.shape != tuple(info.shape):
        raise data_lib.DataError(f"{source.origin}: images are {'x'.join(map(str, source.shape))} (H x W x C); the "
                                 f"model takes {'x'.join(map(str, info.shape))} ({info.name})")
    if num_classes and source.labels is None:
        raise data_lib.DataError(f"{source.origin}: the model is class-conditional ({num_classes} classes): give "
                                 "'labels' beside 'images' in an .npz file")
    if num_classes and int(source.labels.max()) >= num_classes:
        raise data_lib.DataError(f"{source.origin}: label {int(source.labels.max())} is out of range for the model's "
                                 f"{num_classes} classes")
    if not num_classes and source.labels is not None:
        print(f"note: {source.origin}: the model is unconditional; its labels are not used", file=sys.stderr)
        source = data_lib.make_split(source.images, None, vocab_size=info.vocab_size, origin=source.origin)
    return source, names


# The draws of an image are taken in this many passes over the images, independent of each other; within a pass
# they are stratified in time. The spread of the pass means gives the standard error.
PASSES = 4


def per_image_bounds(trainer: train.Trainer, source: data_lib.ArraySource, draws: int,
                     show_progress: bool = False) -> dict[str, np.ndarray]:
    """Each image's bounds by ``config.eval.method`` (bits/dim ``[N]``: ``bpd``, ``bpd_ode``), the mean of
    ``draws`` draws, with ``<name>_se``, its standard error.

    The draws are copies of the image in one evaluation pass (``vdm.evaluation.evaluate``), each with noise and
    dequantisation of its own, taken in ``PASSES`` independent passes of s = draws / PASSES copies. Within a
    pass the times are stratified: a batch holds s copies of each of its m images, copy k of image j in row
    k m + j, and the VLB's low-discrepancy times u_0 + i / (m s) (mod 1) space an image's copies 1 / s apart,
    each still uniform. Stratifying keeps the mean unbiased and cuts its variance far below that of independent
    times (a single draw's spread is mostly the diffusion term's over t); the standard error is the spread of
    the passes' means (independent: each batch draws its own u_0) / sqrt(PASSES).
    """
    n, mesh, s = len(source), trainer.mesh, draws // PASSES
    m = min(max(1, trainer.config.eval.batch_size // s), n)  # images per batch, a multiple of devices / gcd(s, devices)
    multiple = mesh.size // math.gcd(s, mesh.size)
    m = -(-m // multiple) * multiple
    batches = -(-n // m)
    slots = np.arange(batches * m).reshape(1, batches, 1, m)
    rows = np.minimum(np.broadcast_to(slots, (PASSES, batches, s, m)).reshape(-1), n - 1)  # empty slots: dropped
    tiled = data_lib.ArraySource(source.images[rows], None if source.labels is None else source.labels[rows],
                                 vocab_size=source.vocab_size, num_classes=source.num_classes, kind=source.kind,
                                 origin=source.origin)
    config = trainer.config.copy_and_resolve_references()
    config.eval.num_examples, config.eval.batch_size = 0, m * s  # every row, in whole batches of m images
    result = evaluation.evaluate(trainer.score_step, trainer.state.ema_params, tiled, mesh, config,
                                 show_progress=show_progress, per_example=True, solve_progress=trainer.solve_progress,
                                 what=f"draws ({n} images x {draws}{', padded' if batches * m > n else ''})")
    bounds = {}
    for name, values in result["per_example"].items():
        means = values.reshape(PASSES, batches, s, m).mean(axis=2).reshape(PASSES, batches * m)[:, :n]
        bounds[name] = means.mean(axis=0)
        bounds[f"{name}_se"] = means.std(axis=0, ddof=1) / math.sqrt(PASSES)
    return bounds


def write_csv(path: str, names: list[str], labels: np.ndarray | None, bounds: dict[str, np.ndarray]) -> None:
    """The rows: ``image``, ``label`` (a conditional model), then each bound and its ``_se``, in bits/dim."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image"] + (["label"] if labels is not None else []) + list(bounds))
    for i, name in enumerate(names):
        writer.writerow([name] + ([int(labels[i])] if labels is not None else [])
                        + [f"{bounds[k][i]:.6f}" for k in bounds])
    paths.write_bytes(path, out.getvalue().encode())


def per_image_bpd(config, workdir: str, images, overrides: Mapping[str, Any] | None = None, *,
                  stop_within_s: float | None = None) -> dict:
    """--mode score: bits/dim per image, each image's under the latest checkpoint of ``workdir`` (EMA parameters).

    ``images``: an ``.npz`` path, a folder of PNG files, a uint8 array or ``{"images", "labels"}`` (the
    module's docstring); ``config`` and ``overrides`` as in ``vdm.train.train_and_evaluate``. Returns
    ``scores`` (the CSV's path), ``step``, ``count``, ``names`` (a name per image), each bound per image
    (``bpd``: bits/dim ``[N]``, ``bpd_se``: its Monte Carlo standard error; ``bpd_ode`` with ``eval.method``
    ode or both), ``labels`` for a conditional model.
    """
    config = train.resolve_config(config, overrides)
    read: dict[str, Any] = {}

    def check(info):  # after the config and data are checked, before anything is compiled
        read["source"], read["names"] = read_images(images, info, config.model.num_classes)

    trainer = train.restored_trainer(config, workdir, check_data=check, writes=True)  # the CSV goes to workdir
    source, names = read["source"], read["names"]
    step = int(trainer.state.step)
    try:
        with Signals(stop_within_s):  # a signal ends the pass at once: nothing is written
            bounds = per_image_bounds(trainer, source, config.eval.score_draws, show_progress=True)
    finally:
        trainer.close()
    check_finite(bounds, step)
    path = pictures.unused_name(paths.join(workdir, f"scores_{step}"), (".csv",)) + ".csv"
    if jax.process_index() == 0:
        write_csv(path, names, source.labels, bounds)
    labels = {} if source.labels is None else {"labels": np.asarray(source.labels)}
    return {"scores": path, "step": step, "count": len(source), "names": names} | bounds | labels


def check_finite(bounds: dict[str, np.ndarray], step: int) -> None:
    """NonFiniteError (one line; the command line's exit code 3) when an image's bound is NaN or infinite: the
    parameters give no bound of it, and a CSV of such rows is no result (none is written).

    Args:
        bounds: ``per_image_bounds``'s (``bpd`` ``[N]``, ``bpd_se`` ``[N]``, ...).
        step: the checkpoint's step, for the message.

    Raises:
        vdm.health.NonFiniteError: naming the bounds' means and how many images have a non-finite bound.
    """
    bad = [k for k, v in bounds.items() if not np.all(np.isfinite(v))]
    if bad:
        means = [f"mean_{k}={float(np.mean(bounds[k]))}" for k in bounds if f"{k}_se" in bounds]
        images = int(np.sum(~np.all(np.isfinite(np.stack([bounds[k] for k in bad])), axis=0)))
        raise health.NonFiniteError(f"non-finite bits/dim at step {step} ({', '.join(means)}; {images} of "
                                    f"{len(bounds[bad[0]])} images): the parameters give no finite bound (nothing "
                                    "was written)")


def summary(result: dict, draws: int) -> list[str]:
    """The lines ``--mode score`` prints: the bounds' spread over the images, and the CSV's path."""
    lines = []
    for name in [k for k in result if f"{k}_se" in result]:
        v, se = result[name], result[f"{name}_se"]
        what = "the VLB" if name == "bpd" else "the probability-flow ODE" if name == "bpd_ode" else name
        lines.append(f"bits/dim by {what} of {result['count']} images: mean {v.mean():.4f}, median {np.median(v):.4f}, "
                     f"{v.min():.4f} to {v.max():.4f}; each +- {np.median(se):.4f} (the median standard error, "
                     f"{draws} draws)")
    return lines + [f"scores: {result['scores']} (step {result['step']})"]


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The area under the ROC curve of telling ``outside`` images from ``inside`` ones by their bits/dim per image
    (higher: outside): P(an outside image takes more bits/dim than an inside one), ties counted half."""
    inside, outside = np.asarray(inside, np.float64), np.asarray(outside, np.float64)
    greater = (outside[:, None] > inside[None, :]).mean()
    ties = (outside[:, None] == inside[None, :]).mean()
    return float(greater + 0.5 * ties)
