"""Metric logging: JSON lines + TensorBoard files, and a terminal progress display.

* :class:`MetricWriter` appends ``{"step": ..., name: value, ...}`` lines to
  ``workdir/metrics.jsonl`` and writes TensorBoard scalar/image events under
  ``workdir/tensorboard/`` with ``tensorboardX`` (no TensorFlow needed). The workdir may
  be a cloud URL (``gs://...``): both go through ``vdm.paths`` / ``etils.epath``.
* :class:`Progress` shows tqdm's bar in a Jupyter / Colab notebook (``tqdm.auto``: a
  widget), a one-line, in-place progress bar on an interactive terminal, and plain periodic
  log lines otherwise (files, CI).
* :func:`read_jsonl` loads a metrics file back as a list of dicts.

In multi-process runs only the main process (``jax.process_index() == 0``)
writes or prints; the others get no-op objects with the same interface.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
import numpy as np

from vdm import paths

__all__ = ["MetricWriter", "Progress", "format_eta", "in_notebook", "read_jsonl", "strict"]


def strict(values: Mapping[str, Any]) -> dict:
    """``values`` with NaN and infinities as None: strict JSON (``null``), which every parser reads."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in values.items()}


def _default_is_main() -> bool:
    return jax.process_index() == 0


def _to_scalar(name: str, value: Any) -> bool | int | float:
    """Python scalar from a Python/numpy/JAX scalar (or size-1 array)."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {name!r} is not a scalar (shape {arr.shape})")
    item = arr.reshape(()).item()
    if isinstance(item, (bool, int, float)):
        return item
    raise TypeError(f"metric {name!r} has non-numeric value {value!r}")


class MetricWriter:
    """Write scalar metrics (and optionally images) for one run.

    Args:
      workdir: run directory; created if missing.
      enable_tensorboard: also write TensorBoard event files to
        ``workdir/tensorboard``.
      is_main: whether this process writes; default ``jax.process_index() == 0``
        (which initialises JAX's backend, so create writers after
        ``vdm.parallel.maybe_initialize_distributed``).

    ``metrics.jsonl`` is opened in append mode, so a resumed run continues the
    same file, after cutting an incomplete last line that a killed run left.  It is strict JSON:
    non-finite values are written as ``null``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enable_tensorboard: bool = True,
        is_main: bool | None = None,
    ):
        self.workdir = os.fspath(workdir)
        self.jsonl_path = paths.join(self.workdir, "metrics.jsonl")
        self.tensorboard_dir = paths.join(self.workdir, "tensorboard")
        self.is_main = _default_is_main() if is_main is None else bool(is_main)
        self._open = False
        self._tb: Any = None
        self.notes: list[str] = []  # one line each, for the run's log
        if not self.is_main:
            return
        paths.path(self.workdir).mkdir(parents=True, exist_ok=True)
        if paths.heal_last_line(self.jsonl_path):  # a run killed mid-write: its last record is incomplete
            self.notes.append(f"note: {self.jsonl_path}: dropped an incomplete last line (a run stopped mid-write)")
        self._open = True
        if enable_tensorboard:
            from tensorboardX import SummaryWriter  # lazily (0.5 s): only a writer with TensorBoard files needs it

            if not paths.is_local(self.tensorboard_dir):
                _register_epath_event_writer(self.tensorboard_dir.split("://")[0])
            self._tb = SummaryWriter(logdir=self.tensorboard_dir, flush_secs=30)

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Record ``scalars`` (name -> number, JAX/numpy scalars accepted) at ``step``."""
        if not self.is_main:
            return
        if not self._open:
            raise RuntimeError("MetricWriter is closed")
        if "step" in scalars:
            raise ValueError("'step' is reserved; pass it as the step argument")
        values = {name: _to_scalar(name, v) for name, v in scalars.items()}
        step = int(step)
        paths.append_text(self.jsonl_path, json.dumps({"step": step, **strict(values)}, allow_nan=False) + "\n")
        if self._tb is not None:
            for name, v in values.items():
                self._tb.add_scalar(name, float(v), global_step=step)

    def write_image(self, step: int, name: str, image: Any) -> None:
        """Record a ``uint8`` image of shape ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``."""
        if not self.is_main:
            return
        img = np.asarray(image)
        if img.dtype != np.uint8:
            raise TypeError(f"image {name!r} must be uint8, got {img.dtype}")
        if img.ndim == 3 and img.shape[-1] == 1:
            img = img[..., 0]
        if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (3, 4))):
            raise ValueError(f"image {name!r} must be HW or HWC with C in (1, 3, 4), got shape {img.shape}")
        step = int(step)
        if self._tb is not None:
            self._tb.add_image(name, img, global_step=step, dataformats="HW" if img.ndim == 2 else "HWC")

    def flush(self) -> None:
        """Push buffered TensorBoard events (JSON lines are written on every write)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close the files; further writes raise (idempotent)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self._open = False

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Load a JSON-lines file as a list of dicts.

    Blank lines are skipped.  A malformed *last* line (a run killed mid-write)
    is dropped; a malformed line elsewhere raises ``ValueError`` naming the line.
    """
    text = paths.path(path).read_text()
    lines = [(i, ln) for i, ln in enumerate(text.splitlines(keepends=True), start=1) if ln.strip()]
    records = []
    for k, (lineno, line) in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if k == len(lines) - 1 and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{lineno}: invalid JSON line ({e.msg})") from None
    return records


def format_eta(seconds: float | None) -> str:
    """``H:MM:SS`` (hours unbounded), rounded to the second; ``--:--:--`` if unknown.

    >>> format_eta(102), format_eta(3725.4), format_eta(90061)
    ('0:01:42', '1:02:05', '25:01:01')
    """
    if seconds is None or not math.isfinite(seconds):
        return "--:--:--"
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (a notebook, Colab), where ``tqdm.auto`` draws a widget."""
    ipython = sys.modules.get("IPython")  # never imported here: a notebook has already imported it
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _format_value(value: Any) -> str:
    try:
        v = float(np.asarray(value))
    except (TypeError, ValueError):
        return str(value)
    return f"{v:.4g}"


class Progress:
    """Training progress: tqdm in a notebook, an in-place bar on a terminal, periodic log lines otherwise.

    Call :meth:`update` after every step with the number of completed steps and
    any scalars to show (e.g. ``loss=..., bpd=...``).  Scalars may be JAX
    arrays: they are only converted (which waits for the device) when a line is
    actually shown.  Plain-mode lines look like::

        step 100/1500  loss 1.234  bpd 1.23  12.3 steps/s  ETA 0:01:42

    Args:
      total_steps: last step number.
      initial_step: step the run starts from (non-zero when resuming).
      log_every: plain mode prints when ``step % log_every == 0`` and at the
        last step.
      stream: output stream (default ``sys.stderr``).
      interactive: force in-place (``True``) or plain (``False``) mode; default
        ``stream.isatty()``.
      notebook: draw with ``tqdm.auto`` instead (a widget in Jupyter and Colab,
        scalars as its postfix); default :func:`in_notebook`.
      is_main: whether this process prints; default ``jax.process_index() == 0``.
      min_interval: in-place mode redraws at most this often (seconds).
      rate_window: steps/s and ETA are measured over roughly the last this
        many seconds.
      clock: time source (monotonic seconds), replaceable for tests.
      unit: what is counted (``step``; ``batch`` for evaluation).
    """

    _BAR_WIDTH = 24

    def __init__(
        self,
        total_steps: int,
        *,
        initial_step: int = 0,
        log_every: int = 100,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        notebook: bool | None = None,
        is_main: bool | None = None,
        min_interval: float = 0.1,
        rate_window: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        unit: str = "step",
    ):
        self.unit = unit
        if total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {total_steps}")
        if log_every <= 0:
            raise ValueError(f"log_every must be positive, got {log_every}")
        self.total_steps = int(total_steps)
        self.log_every = int(log_every)
        self.stream = sys.stderr if stream is None else stream
        if interactive is None:
            isatty = getattr(self.stream, "isatty", None)
            interactive = bool(isatty and isatty())
        self.interactive = interactive
        self.notebook = in_notebook() if notebook is None else bool(notebook)
        self._bar: Any = None  # notebook mode: the tqdm bar, made at the first update (below the start-up lines)
        self.initial_step = int(initial_step)
        self.is_main = _default_is_main() if is_main is None else bool(is_main)
        self._min_interval = min_interval
        self._rate_window = rate_window
        self._clock = clock
        now = clock()
        # (time, step) samples, oldest first, thinned to a few per second.
        self._samples: deque[tuple[float, int]] = deque([(now, int(initial_step))])
        self._last_draw = -math.inf
        self._drawn = False

    def _rate(self, now: float, step: int) -> float | None:
        """Steps per second over the recent window, ``None`` before any progress."""
        t0, s0 = self._samples[0]
        if now <= t0 or step <= s0:
            return None
        return (step - s0) / (now - t0)

    def _record(self, now: float, step: int) -> None:
        if now - self._samples[-1][0] >= 0.25:
            self._samples.append((now, step))
        while len(self._samples) > 1 and now - self._samples[1][0] >= self._rate_window:
            self._samples.popleft()

    def format_line(self, step: int, scalars: Mapping[str, Any], now: float) -> str:
        """The status text for ``step`` (without bar or line ending)."""
        parts = [f"{self.unit} {step}/{self.total_steps}"]
        parts += [f"{name} {_format_value(v)}" for name, v in scalars.items()]
        rate = self._rate(now, step)
        units = f"{self.unit}es" if self.unit.endswith("ch") else f"{self.unit}s"
        if rate is None:
            parts += [f"-- {units}/s", f"ETA {format_eta(None)}"]
        else:
            shown = f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"
            parts += [f"{shown} {units}/s", f"ETA {format_eta((self.total_steps - step) / rate)}"]
        return "  ".join(parts)

    def update(self, step: int, **scalars: Any) -> None:
        """Report that ``step`` steps are done; shows a line when due."""
        if not self.is_main:
            return
        step = int(step)
        now = self._clock()
        self._record(now, step)
        last = step >= self.total_steps
        if self.notebook:
            if self._bar is None:
                from tqdm.auto import tqdm  # lazily: only a notebook's progress bar needs it

                self._bar = tqdm(total=self.total_steps, initial=self.initial_step, unit=self.unit, file=self.stream)
            if scalars:
                self._bar.set_postfix({name: _format_value(v) for name, v in scalars.items()}, refresh=False)
            self._bar.update(step - self._bar.n)
        elif self.interactive:
            if last or now - self._last_draw >= self._min_interval:
                self._last_draw = now
                frac = min(max(step / self.total_steps, 0.0), 1.0)
                filled = int(round(frac * self._BAR_WIDTH))
                bar = "#" * filled + "." * (self._BAR_WIDTH - filled)
                line = f"[{bar}] {self.format_line(step, scalars, now)}"
                self.stream.write("\r" + line + "\x1b[K")
                self.stream.flush()
                self._drawn = True
        elif last or step % self.log_every == 0:
            self.stream.write(self.format_line(step, scalars, now) + "\n")
            self.stream.flush()

    def log(self, message: str) -> None:
        """Print a message on its own line without garbling the in-place bar."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
            return
        if self.interactive and self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False
            self._last_draw = -math.inf  # redraw the bar on the next update
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line or the tqdm bar (no-op in plain mode)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.is_main and self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _EpathEventWriter:
    """tensorboardX's record writer for URLs it cannot write itself: the whole file rewritten on flush."""

    def __init__(self, path: str):
        self._path, self._data = path, bytearray()

    def write(self, data: bytes) -> None:
        self._data += data

    def flush(self) -> None:
        paths.write_bytes(self._path, bytes(self._data))

    def close(self) -> None:
        self.flush()


class _EpathEventWriterFactory:
    def open(self, path: str) -> _EpathEventWriter:
        return _EpathEventWriter(path)

    def directory_check(self, path: str) -> None:
        paths.path(path).mkdir(parents=True, exist_ok=True)


def _register_epath_event_writer(scheme: str) -> None:
    from tensorboardX import record_writer  # lazily, as SummaryWriter above

    record_writer.register_writer_factory(scheme, _EpathEventWriterFactory())
