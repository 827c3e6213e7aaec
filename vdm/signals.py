"""SIGINT and SIGTERM: a training run saves and stops; evaluation and sampling stop at once.

``Signals`` is a context manager around a run. While ``deferring`` (the training steps), the
first signal only sets ``requested``, and the loop finishes its step, saves and returns.
Otherwise, and at a second signal, ``Interrupted`` is raised where the program is, and the
command line exits with 128 + the signal's number.

Python runs a signal's handler only between bytecodes of the main thread, so a signal that comes
while the main thread waits inside one long computation (an XLA call: a batch of an exact-divergence
ODE evaluation can take an hour) would wait for it. With ``stop_within_s`` (the command line's
choice; a notebook's kernel must not be ended), a thread woken by the signal itself
(``signal.set_wakeup_fd``) ends the process with the same line and exit code when the handler has
not run within that many seconds. A training run then resumes from its last checkpoint, as after
any hard stop; evaluation and sampling save nothing.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time


class Interrupted(BaseException):
    """SIGINT or SIGTERM where there is nothing to save (evaluation, sampling), or a second SIGINT.

    A ``BaseException``, like ``KeyboardInterrupt``: library code that catches ``Exception`` (JAX's
    persistent compilation cache write, for one) must not swallow it and carry on."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = 128 + signal.Signals[signal_name].value


class Signals:
    """SIGINT and SIGTERM. While ``deferring`` (the training steps), the first one only sets
    ``requested``: the loop finishes the current step, saves and stops. Otherwise, and at a
    second signal, ``Interrupted`` is raised at once. ``stop_within_s``: see the module's docstring."""

    def __init__(self, stop_within_s: float | None = None):
        self.requested: str | None = None
        self.deferring = False
        self.stop_within_s = stop_within_s
        self._old = {}
        self._handled = 0  # handler calls, for the watchdog
        self._wakeup: tuple[int, int, int] | None = None  # (read end, write end, the old wakeup fd)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals stay as they were
                pass
        if self._old and self.stop_within_s is not None:
            read, write = os.pipe()
            os.set_blocking(write, False)
            self._wakeup = (read, write, signal.set_wakeup_fd(write, warn_on_full_buffer=False))
            threading.Thread(target=self._watch, args=(read,), name="vdm-signal-watchdog", daemon=True).start()
        return self

    def _handler(self, signum, frame):
        self._handled += 1
        name = signal.Signals(signum).name
        if self.deferring and self.requested is None:
            self.requested = name
            return
        raise Interrupted(name)

    def _watch(self, read: int) -> None:
        """Wake at each signal; end the process if its handler has not run within ``stop_within_s``."""
        arrived = 0
        while True:
            try:
                data = os.read(read, 64)
            except OSError:
                data = b""
            if not data:  # the context ended
                os.close(read)
                return
            for signum in data:
                if signum not in (signal.SIGINT, signal.SIGTERM):
                    continue
                arrived += 1
                deadline = time.monotonic() + self.stop_within_s
                while self._handled < arrived and time.monotonic() < deadline:
                    time.sleep(0.05)
                if self._handled < arrived:
                    name = signal.Signals(signum).name
                    sys.stderr.write(f"stopped by {name} (within one long computation: ended it without waiting)\n")
                    sys.stderr.flush()
                    sys.stdout.flush()
                    os._exit(128 + signum)

    def __exit__(self, *exc):
        if self._wakeup is not None:
            read, write, old_fd = self._wakeup
            signal.set_wakeup_fd(old_fd)
            os.close(write)  # the watchdog reads the end of the pipe and returns
            self._wakeup = None
        for sig, old in self._old.items():
            signal.signal(sig, old)
