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


class WriteError(OSError):
    """A file could not be written (a full disk, a missing permission): one line naming the file."""


def write_bytes(p: PathLike, data: bytes) -> None:
    """Write ``data`` to ``p``, creating its directory. Atomic on a local disk: the bytes go to a
    temporary file beside ``p`` that then replaces it, so a full disk or a kill mid-write leaves the
    old file whole (and no temporary one). An object store's write is whole or nothing already.
    A failure is ``WriteError``, one line naming ``p``."""
    target = path(p)
    temporary = f"{os.fspath(p)}.tmp-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not is_local(p):
            target.write_bytes(data)
            return
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, os.fspath(p))
    except BaseException as e:
        if os.path.exists(temporary):
            os.remove(temporary)
        if not isinstance(e, OSError):
            raise
        error = WriteError(f"cannot write {os.fspath(p)}: {e.strerror or e}")
        error.errno = e.errno
        raise error from e


def heal_last_line(p: PathLike) -> bool:
    """Cut a partial last line (a write cut off by a kill or a full disk) from the text file ``p``, so that
    what is appended next starts on a line of its own. True if there was one to cut."""
    target = path(p)
    if not target.exists():
        return False
    text = target.read_bytes()
    if not text or text.endswith(b"\n"):
        return False
    kept = text[:text.rfind(b"\n") + 1]
    if is_local(p):
        with open(os.fspath(p), "r+b") as f:
            f.truncate(len(kept))
    else:
        target.write_bytes(kept)
    return True


def append_text(p: PathLike, text: str) -> None:
    """Append ``text`` to ``p`` (a rewrite of the whole object where the store cannot append)."""
    target = path(p)
    if is_local(p):
        with open(os.fspath(p), "a", encoding="utf-8") as f:
            f.write(text)
        return
    old = target.read_text() if target.exists() else ""
    target.write_text(old + text)
