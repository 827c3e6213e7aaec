"""Checkpointing of one training-state pytree with Orbax.

:class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager`` for a
single item (params, optimizer state, EMA params, step, RNG key, small extra
arrays; any pytree of arrays and Python scalars)::

    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(target=abstract_like(state))   # onto state's shardings
    ...
    ckpt.save(step, state)                         # async
    ...
    ckpt.close()                                   # waits for pending saves

Saving is asynchronous: :meth:`Checkpointer.save` returns once the arrays are
copied off the devices and writes them in a background thread.  Keep the
object alive and call :meth:`Checkpointer.wait` or :meth:`Checkpointer.close`
before the process exits.  In multi-process runs every process must call
``save``/``restore`` (Orbax coordinates which process writes what).

PRNG keys: both raw ``uint32[2]`` keys (``jax.random.PRNGKey``) and typed keys
(``jax.random.key``) are supported.  Raw keys are plain arrays.  Typed keys are
stored as their ``uint32`` key data and come back as typed keys only when the
restore target holds a typed key (or a ``ShapeDtypeStruct`` with a key dtype);
restoring without a target returns the raw key data.

Verification: each save records a fingerprint of the state (one position-weighted
uint32 sum of the bits of every leaf, computed on the devices) and the caller's
metadata (the trainer's config and data) in Orbax's step metadata; :meth:`Checkpointer.restore`
recomputes the fingerprint and raises :class:`DamagedCheckpoint` when it differs, or when
the files cannot be read. :meth:`Checkpointer.restore_newest_good` falls back to the newest
step that restores intact and moves the damaged newer ones aside (``<step>.damaged``),
never deleting them; when no step is good it moves nothing. The fingerprint and the comparison of a
tree with its restore target are ``vdm.checkpoint_tree``'s.

Unfinished saves: a save writes ``<step>.orbax-checkpoint-tmp`` and renames it when whole, so a process
stopped in between leaves that directory; :meth:`Checkpointer.remove_unfinished` (called by a training run,
which holds the workdir's lock) deletes such directories, with a note each.

Errors from a checkpoint that cannot be used (corrupted files, or a tree whose
structure, shapes or dtypes differ from the restore target) are raised as
:class:`CheckpointError` with a one-line message naming the directory.  A
failed restore never deletes anything.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vdm import paths
from vdm.checkpoint_tree import abstract_like, describe_mismatch, fingerprint, listed

__all__ = ["CheckpointError", "Checkpointer", "DamagedCheckpoint", "abstract_like", "fingerprint", "finished_steps"]


class CheckpointError(RuntimeError):
    """A checkpoint could not be saved, found or restored (one-line message)."""


class DamagedCheckpoint(CheckpointError):
    """A step's files cannot be read, or what they hold differs from what was saved."""


def _one_line(err: BaseException) -> str:
    """``Type: first line of the message``, without TensorStore specs, at most ~300 chars."""
    text = str(err).split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0].strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = f"{type(err).__name__}: {line}" if line else type(err).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _megabytes(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def finished_steps(directory: str | os.PathLike) -> list[int]:
    """The steps of the finished saves in ``directory``, sorted; ``[]`` when there is none or no directory.
    Reads only (a ``Checkpointer`` creates its directory)."""
    return sorted(ocp.utils.checkpoint_steps(os.fspath(directory)))


class _Protected:
    """Orbax's preservation policy for the step ``Checkpointer.protect`` names (read at each save)."""

    def __init__(self, checkpointer: "Checkpointer"):
        self._checkpointer = checkpointer

    def should_preserve(self, checkpoints, *, context) -> list[bool]:
        return [c.step == self._checkpointer.protected for c in checkpoints]


class Checkpointer:
    """Save/restore one training-state pytree under ``directory``.

    Args:
      directory: checkpoint root; step ``N`` lives in ``directory/N``.  Created
        if missing.
      max_to_keep: keep only the most recent ``max_to_keep`` steps (``None``
        keeps all), and the step given to :meth:`protect`.  Older steps are deleted
        only when a newer one is saved.
      async_save: write in a background thread (default) or block in ``save``.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
    ):
        directory = os.fspath(directory)
        self._directory = os.path.abspath(directory) if paths.is_local(directory) else directory
        where = paths.path(self._directory)
        if where.exists() and not where.is_dir():
            raise CheckpointError(f"checkpoint directory {self._directory} exists but is not a directory")
        self._protected: int | None = None
        self._pending: int | None = None  # the step an asynchronous save is writing
        keep = [ocp.checkpoint_managers.LatestN(max_to_keep), _Protected(self)]
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
            save_interval_steps=1,
            create=True,
            enable_async_checkpointing=async_save,
        )
        try:
            self._manager = ocp.CheckpointManager(
                self._directory,
                options=options,
                item_handlers=ocp.StandardCheckpointHandler(),
            )
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise CheckpointError(f"cannot open checkpoint directory {self._directory}: {_one_line(e)}") from e

    def protect(self, step: int | None) -> None:
        """Keep ``step`` (None: no step) out of the rotation of ``max_to_keep``, in addition to the newest."""
        self._protected = None if step is None else int(step)

    @property
    def protected(self) -> int | None:
        """The step kept out of the rotation (``protect``)."""
        return self._protected

    @property
    def directory(self) -> str:
        """Absolute path of the checkpoint root."""
        return self._directory

    def all_steps(self) -> list[int]:
        """Sorted steps with a finished checkpoint on disk."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """Most recent saved step, or ``None`` if there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None) -> bool:
        """Start saving ``state`` as ``step`` (asynchronously by default), with its fingerprint and ``meta``.

        An existing step is never overwritten (the call returns ``False``).
        ``state`` is a pytree of ``jax.Array``/numpy arrays/Python scalars; ``meta`` a JSON-able
        dict kept with the step (``step_metadata``). Returns whether a save was started.
        The previous save is finished first (its failure names its own step), and a local disk without
        room for the state is ``CheckpointError`` before anything is written.
        """
        step = int(step)
        self.wait()
        if step in self._manager.all_steps():
            return False
        self._check_room(step, state)
        custom = dict(meta or {}) | {"fingerprint": fingerprint(state)}
        try:
            started = bool(self._manager.save(step, args=ocp.args.StandardSave(state), force=True,
                                              custom_metadata=custom))
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise CheckpointError(f"saving step {step} to {self._directory} failed: {_one_line(e)}") from e
        self._pending = step if started else None
        return started

    def _check_room(self, step: int, state: Any) -> None:
        """CheckpointError when a local disk has less free space than the state's bytes, a quarter more for
        Orbax's files and 256 KiB (measured: a step of the test model takes its bytes plus about 20%)."""
        if not paths.is_local(self._directory):
            return
        size = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state) if hasattr(x, "dtype"))
        needed = size + size // 4 + (256 << 10)
        where = self._directory
        while not os.path.exists(where):
            where = os.path.dirname(where)
        free = shutil.disk_usage(where).free
        if free < needed:
            raise CheckpointError(f"no room to save step {step} in {self._directory}: it needs about "
                                  f"{_megabytes(needed)}, the disk has {_megabytes(free)} free; "
                                  f"the checkpoints already saved are kept")

    def step_metadata(self, step: int) -> dict:
        """The ``meta`` saved with ``step`` and its ``fingerprint`` ({} when unreadable or absent)."""
        try:
            return dict(self._manager.metadata(int(step)).custom_metadata or {})
        except Exception:  # noqa: BLE001 - a damaged step: restore says how
            return {}

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint found in {self._directory}")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            listed = ", ".join(map(str, steps))
            raise CheckpointError(f"step {step} not found in {self._directory} (available: {listed})")
        return int(step)

    def restore(self, step: int | None = None, target: Any = None) -> Any:
        """Restore a saved state.

        Args:
          step: which step (default: the latest).
          target: a pytree with the structure of the saved state whose leaves
            are example arrays or ``jax.ShapeDtypeStruct``; arrays are restored
            with each leaf's shape, dtype and sharding (so state can be
            restored directly onto a mesh).  ``None`` restores the tree as
            saved (lists instead of tuples/named tuples, raw key data).
          sharding: sharding for target leaves that carry none (e.g. from
            ``jax.eval_shape``), typically ``replicated(mesh)``.

        Raises:
          CheckpointError: no checkpoint, unknown step, checkpoint unreadable,
            or its tree does not match ``target``.
        """
        step = self._check_step(step)
        where = f"checkpoint step {step} in {self._directory}"
        try:
            stored = self._manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise DamagedCheckpoint(f"{where} is damaged: cannot read its metadata ({_one_line(e)})") from e
        stored_tree = getattr(stored, "tree", stored)
        if stored_tree is None:
            raise DamagedCheckpoint(f"{where} is damaged: it has no state metadata")
        abstract = None
        if target is not None:
            abstract = abstract_like(target)
            mismatch = describe_mismatch(stored_tree, abstract)
            if mismatch is not None:
                raise CheckpointError(f"{where} does not match the restore target: {mismatch}")
        try:
            restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as e:  # noqa: BLE001 - re-raised with context
            raise DamagedCheckpoint(f"{where} is damaged: cannot restore it ({_one_line(e)})") from e
        saved = self.step_metadata(step).get("fingerprint")
        if saved is not None:
            now = fingerprint(restored)
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            if changed:
                raise DamagedCheckpoint(f"{where} is damaged: {listed(changed)} differ(s) from what was saved "
                                        "(fingerprint)")
        return restored

    def restore_newest_good(self, target: Any, read_only: bool = False,
                            upto: int | None = None) -> tuple[int | None, Any, list[str]]:
        """(step, state, notes) from the newest step (at most ``upto``) that restores intact; (None, None, [])
        if there is none.

        Newer damaged steps are moved aside to ``<step>.damaged`` (never deleted), each with a
        note; with ``read_only`` (evaluation, sampling) they are left in place, each with a note. If
        every step is damaged, nothing is moved and ``CheckpointError`` says so. A step that does not
        match ``target`` (another model) is not damage: that error is raised as is.
        """
        damaged: list[tuple[int, str]] = []
        for step in reversed([s for s in self.all_steps() if upto is None or s <= upto]):
            try:
                state = self.restore(step, target)
            except DamagedCheckpoint as e:
                damaged.append((step, str(e)))
                continue
            if read_only:
                return step, state, [f"{reason}; left it in place (this mode only reads) and used step {step}"
                                     for _, reason in damaged]
            notes = [f"{reason}; moved it to {self.move_aside([bad], 'damaged')[0]} and resumed from step {step}"
                     for bad, reason in damaged]
            return step, state, notes
        if damaged:
            raise CheckpointError(f"no intact checkpoint in {self._directory} (nothing was moved): "
                                  + "; ".join(reason for _, reason in damaged))
        return None, None, []

    def remove_unfinished(self) -> list[str]:
        """Delete the directories of saves that never finished, one note each.

        A save writes ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` when it is whole; a process
        stopped in between (a second Ctrl-C during a save, a kill) leaves the temporary directory for good. Only
        the run holding the workdir's lock may call this (``vdm.resume.restore_newest`` when training): a save in
        progress is such a directory too, so a reader (eval, sample, score) must not. (Orbax's own
        ``cleanup_tmp_directories`` option removes them silently whenever a manager opens, readers' included.)
        """
        names = sorted(ocp.path.step.tmp_checkpoints(self._directory))
        if jax.process_index() == 0:
            for name in names:
                (paths.path(self._directory) / name).rmtree()
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"vdm unfinished saves {names} removed")
        return [f"removed {paths.join(self._directory, name)}: a save that never finished (its process was stopped "
                "during the save)" for name in names]

    def move_aside(self, steps: list[int], why: str) -> list[str]:
        """Rename each of ``steps`` to ``<step>.<why>`` (``.<why>2``, ... where taken); never deletes. The new paths."""
        moved = []
        for step in steps:
            source = paths.path(self._directory) / str(step)
            target = paths.path(self._directory) / f"{step}.{why}"
            n = 1
            while target.exists():
                n += 1
                target = paths.path(self._directory) / f"{step}.{why}{n}"
            if jax.process_index() == 0:
                source.rename(target)
            moved.append(str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"vdm checkpoints {steps} moved aside")
        if steps:
            self._manager.reload()
        return moved

    def wait(self) -> None:
        """Block until every pending asynchronous save is on disk (a failure names the step it was saving)."""
        pending, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - re-raised with context
            which = f"step {pending}" if pending is not None else "a step"
            raise CheckpointError(f"saving {which} to {self._directory} failed: {_one_line(e)}") from e

    def close(self) -> None:
        """Wait for pending saves and release Orbax's resources (errors as CheckpointError)."""
        try:
            self.wait()
        finally:
            try:
                self._manager.close()
            except Exception as e:  # noqa: BLE001 - e.g. a full disk surfacing again
                raise CheckpointError(f"closing {self._directory} failed: {_one_line(e)}") from e

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
