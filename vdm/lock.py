"""One training run per workdir.

:class:`WorkdirLock` holds an exclusive ``fcntl.flock`` on ``<workdir>/lock`` for the life of a
training run (process 0 takes it for every process of a multi-host run). The operating system
releases it when the holder exits in any way, SIGKILL included, so a lock is never stale; the
file itself only says who holds it. A second training run in the same workdir fails at once
with one line naming the holder. Evaluation and sampling do not take it: they only read.

Cloud workdirs (``gs://...``) have no file locks; there the lock is a no-op and the run says so.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from vdm import paths


class WorkdirError(RuntimeError):
    """The workdir cannot be used (one-line message)."""


def check_workdir(workdir: str) -> None:
    """WorkdirError (one line) if ``workdir``'s file system cannot be reached: a ``gs://`` or ``s3://``
    workdir without its package (gcsfs, s3fs), found before the data are loaded."""
    try:
        paths.path(workdir).exists()
    except ImportError as e:
        raise WorkdirError(f"--workdir {workdir}: {' '.join(str(e).split())}") from None


class WorkdirBusy(WorkdirError):
    """Another training run holds the workdir (one-line message)."""


class WorkdirLock:
    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = paths.join(workdir, "lock")
        self._file = None

    @property
    def supported(self) -> bool:
        return paths.is_local(self.workdir)

    def _open(self):
        """The lock file opened for appending (the workdir made if missing; nothing in it changed), or
        WorkdirError: this process cannot write in the workdir."""
        try:
            os.makedirs(self.workdir, exist_ok=True)
            return open(self.path, "a+")
        except OSError as e:
            raise WorkdirError(f"cannot write to the workdir {self.workdir}: {e.strerror or e}") from None

    def check_writable(self) -> None:
        """WorkdirError (one line) when this process cannot write in the workdir: the check ``acquire`` makes,
        without taking the lock (a mode that writes its results beside a run's checkpoints, ``--mode score``)."""
        if self.supported:
            self._open().close()

    def acquire(self, is_main: bool = True) -> WorkdirLock:
        """Take the lock (process 0 only: ``is_main``), or raise WorkdirBusy naming the holder."""
        if not (is_main and self.supported):
            return self
        f = self._open()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise WorkdirBusy(f"{self.workdir} is in use by another training run ({holder}); wait for it, stop "
                              "it, or use another --workdir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_everywhere(lock: WorkdirLock) -> None:
    """Process 0 takes the workdir lock; every process learns whether it got it (WorkdirBusy on all if not)."""
    try:
        lock.acquire(is_main=jax.process_index() == 0)
        busy = None
    except WorkdirBusy as e:
        busy = e
    if jax.process_count() > 1:
        if int(multihost_utils.broadcast_one_to_all(np.int32(busy is not None))) and busy is None:
            busy = WorkdirBusy(f"{lock.workdir} is in use by another training run (see process 0)")
    if busy is not None:
        raise busy


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"]))
        return f"pid {holder['pid']} on {holder['host']}, since {started}"
    except (ValueError, KeyError, TypeError):
        return "a process that has not written its name yet"
