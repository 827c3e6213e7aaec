"""Where the trainer's files go: local directories and cloud URLs (``gs://``, ``s3://``) alike.

Every file the trainer writes (``config.json``, ``metrics.jsonl``, TensorBoard events,
``samples_<step>.npz`` / ``.png``, checkpoints through Orbax) goes through
``etils.epath``, which Orbax already uses, so a TPU pod run can keep its workdir on GCS
(``--workdir gs://bucket/runs/x``; ``gs://`` needs ``pip install gcsfs``). Object stores
cannot append, so ``append_text`` rewrites the whole object (metrics files are small).
Only process 0 writes shared files; the callers check ``jax.process_index()``.
"""
from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def path(p: PathLike) -> epath.Path:
    """``p`` as an ``epath.Path`` (a local path, ``gs://...``, ``s3://...``)."""
    return epath.Path(p)


def is_local(p: PathLike) -> bool:
    """True for a path on this machine's file system (no ``scheme://``)."""
    return "://" not in os.fspath(p)


def join(base: PathLike, *parts: str) -> str:
    """``base/part/...`` as a string, for local paths and URLs alike."""
    return os.fspath(path(base).joinpath(*parts))


def write_bytes(p: PathLike, data: bytes) -> None:
    """Write ``data`` to ``p``, creating its directory."""
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def append_text(p: PathLike, text: str) -> None:
    """Append ``text`` to ``p`` (a rewrite of the whole object where the store cannot append)."""
    target = path(p)
    if is_local(p):
        with open(os.fspath(p), "a", encoding="utf-8") as f:
            f.write(text)
        return
    old = target.read_text() if target.exists() else ""
    target.write_text(old + text)
