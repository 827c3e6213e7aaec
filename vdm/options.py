"""The checks of a piece's options: one error that names the option, and the checks pieces share.

A piece chosen by name (a sampler, the ODE likelihood, a schedule's endpoints, a data source)
checks its own keyword options, once, with these, and raises :class:`OptionError`. Called
directly, the piece fails with ``segments=0: must be an integer >= 1``; through a config,
``vdm.configlib.validate`` asks the piece before anything is compiled and turns the error
into one line naming the config field, ``config.sample.sampler_kwargs.segments=0: must be an
integer >= 1``. A check tests the type as well as the range: values from the command line
that do not parse as numbers (``--config.sample.sampler_kwargs.atol=abc``) arrive as strings.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

from vdm import registry


class OptionError(ValueError):
    """An option's value is invalid: ``"<option>=<value!r>: <problem>"``, one line."""

    def __init__(self, option: str, value, problem: str):
        super().__init__(f"{option}={value!r}: {problem}")
        self.option, self.value, self.problem = option, value, problem


def _real(value) -> bool:
    """A finite real number (a bool is not one)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def choice(option: str, value, table: Mapping) -> None:
    """``value`` must be a name in the registry ``table``."""
    try:
        registry.lookup(table, value, option)
    except ValueError:
        raise OptionError(option, value, f"valid names: {', '.join(table)}") from None


def positive(option: str, value) -> None:
    """``value`` must be a finite number > 0 (a tolerance, a scale)."""
    if not (_real(value) and value > 0):
        raise OptionError(option, value, "must be a finite number > 0")


def positive_int(option: str, value) -> None:
    """``value`` must be an integer >= 1 (a count)."""
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
        raise OptionError(option, value, "must be an integer >= 1")


def nonnegative_int(option: str, value) -> None:
    """``value`` must be an integer >= 0 (a count that may be zero)."""
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0):
        raise OptionError(option, value, "must be an integer >= 0")


def nonnegative(option: str, value) -> None:
    """``value`` must be a finite number >= 0 (a noise level)."""
    if not (_real(value) and value >= 0):
        raise OptionError(option, value, "must be a finite number >= 0")


def flag(option: str, value) -> None:
    """``value`` must be True or False."""
    if not isinstance(value, bool):
        raise OptionError(option, value, "must be True or False")


def text(option: str, value) -> None:
    """``value`` must be a non-empty string (a name, a key)."""
    if not (isinstance(value, str) and value):
        raise OptionError(option, value, "must be a non-empty string")


def in_range(option: str, value, low: float, high: float, meaning: str = "") -> None:
    """``value`` must be a number in [low, high]; ``meaning`` (e.g. ``"(0: off)"``) follows the message."""
    if not (_real(value) and low <= value <= high):
        raise OptionError(option, value, f"must be in [{low:g}, {high:g}]" + (f" {meaning}" if meaning else ""))


def check_all(checks: Mapping, kwargs: Mapping) -> None:
    """Check each option of ``kwargs`` that ``checks`` (name -> ``check(name, value)``) knows.

    An option it does not know is left to the call (which names it as an unexpected keyword) or to
    ``vdm.configlib``, which checks every key against the piece's signature.
    """
    for name, value in kwargs.items():
        if name in checks:
            checks[name](name, value)
