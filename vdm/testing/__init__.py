"""The contract checks of every kind of piece, public: run them on your own pieces as the suite runs them on ours.

``check_piece(kind, name)`` runs every check of ``kind``'s contract on the piece registered as ``name``
(with the example its registration carries) and raises ``AssertionError`` naming the piece and the
check that failed::

    import my_pieces                       # registers "my_schedule" with vdm.schedules.register
    from vdm import testing
    testing.check_piece("schedule", "my_schedule")

``check(kind, piece, name=..., example=...)`` runs the same checks on a piece that is not registered
(the suite's tests of deliberately broken pieces). Each kind's checks live in the module of that
name beside this one (``vdm.testing.schedule``, ...), as ``check(name, piece, example)``.

| kind         | registry                      | what is checked                                                   |
|--------------|-------------------------------|-------------------------------------------------------------------|
| schedule     | ``vdm.schedules.SCHEDULES``   | shapes, dtypes, finiteness, declared endpoints, monotonicity      |
| weighting    | ``vdm.weightings.WEIGHTINGS`` | finiteness, positivity, declared monotonicity, ``is_elbo``        |
| sampler      | ``vdm.samplers.SAMPLERS``     | output shape and dtype, determinism for a fixed key, the key used |
| network      | ``vdm.nets.NETWORKS``         | output shape for its declared inputs, zero at initialisation      |
| source       | ``vdm.data.SOURCES``          | split shapes, levels and labels of a tiny file it writes          |
| prediction   | ``vdm.predictions.PREDICTIONS``| eps_hat = a z + b out recovers eps from the exact output         |
"""
from __future__ import annotations

import contextlib
import functools
import importlib
from collections.abc import Callable, Iterator
from types import MappingProxyType
from typing import Any

# kind -> (the module holding its registry, the registry's name in it)
KINDS = MappingProxyType({
    "schedule": ("vdm.schedules", "SCHEDULES"),
    "weighting": ("vdm.weightings", "WEIGHTINGS"),
    "sampler": ("vdm.samplers", "SAMPLERS"),
    "network": ("vdm.nets", "NETWORKS"),
    "source": ("vdm.data", "SOURCES"),
    "prediction": ("vdm.predictions", "PREDICTIONS"),
})


def _kind(kind: str) -> tuple:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown kind of piece {kind!r}; valid kinds: {', '.join(KINDS)}") from None


def registry_of(kind: str):
    """The :class:`vdm.registry.Registry` of ``kind`` (one of :data:`KINDS`).

    Raises:
        ValueError: an unknown kind.
    """
    module, name = _kind(kind)
    return getattr(importlib.import_module(module), name)


def check(kind: str, piece: Any, *, name: str = "<unregistered>", example: Any = None) -> None:
    """Run every check of ``kind``'s contract on ``piece`` (registered or not).

    Args:
        kind: one of :data:`KINDS`.
        piece: what the kind's registry would hold under ``name``.
        name: the name used in messages.
        example: the inputs the checks need; ``None`` takes the kind's default.

    Raises:
        AssertionError: ``<kind> <name> fails <check>: <what was found>``.
        ValueError: an unknown kind.
    """
    _kind(kind)
    importlib.import_module(f"vdm.testing.{kind}").check(name, piece, example)


def check_piece(kind: str, name: str) -> None:
    """Run every check of ``kind``'s contract on the piece registered as ``name``, with its registered example.

    Args:
        kind: one of :data:`KINDS` ("schedule", "weighting", "sampler", "network", "source", "prediction").
        name: a registered name.

    Raises:
        AssertionError: ``<kind> <name> fails <check>: <what was found>``.
        ValueError: an unknown kind or name.
    """
    entry = registry_of(kind).entry(name)
    check(kind, entry.piece, name=name, example=entry.example)


def checker(kind: str, name: str) -> Callable[[str], contextlib.AbstractContextManager[None]]:
    """``checking`` with the piece fixed: ``check = checker("schedule", name)``, then ``with check("monotonicity"):``."""
    return functools.partial(checking, kind, name)


@contextlib.contextmanager
def checking(kind: str, name: str, what: str) -> Iterator[None]:
    """Name the piece and the check in whatever fails inside: ``AssertionError("<kind> <name> fails <what>: ...")``.

    An exception other than an assertion (the piece raised) fails the check too, with its type and message.
    """
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"{kind} {name!r} fails {what}: {e}") from None
    except Exception as e:  # the piece itself raised: that fails the check, named
        raise AssertionError(f"{kind} {name!r} fails {what}: {type(e).__name__}: {e}") from e
