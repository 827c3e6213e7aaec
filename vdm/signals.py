"""SIGINT and SIGTERM: a training run saves and stops; evaluation and sampling stop at once.

``Signals`` is a context manager around a run. While ``deferring`` (the training steps), the
first signal only sets ``requested``, and the loop finishes its step, saves and returns.
Otherwise, and at a second signal, ``Interrupted`` is raised where the program is, and the
command line exits with 128 + the signal's number.
"""
from __future__ import annotations

import signal


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
    second signal, ``Interrupted`` is raised at once."""

    def __init__(self):
        self.requested: str | None = None
        self.deferring = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: signals stay as they were
                pass
        return self

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if self.deferring and self.requested is None:
            self.requested = name
            return
        raise Interrupted(name)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
