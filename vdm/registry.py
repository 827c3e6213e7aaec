"""The registries of pieces: one per kind, filled by ``register`` decorators, from the package or a user's code.

Each kind of piece (a noise schedule, a loss weighting, a network, a sampler, a data source, a
parameterisation, ...) has one :class:`Registry` in its module (``vdm.schedules.SCHEDULES``,
``vdm.weightings.WEIGHTINGS``, ``vdm.nets.NETWORKS``, ``vdm.samplers.SAMPLERS``, ``vdm.data.SOURCES``,
``vdm.predictions.PREDICTIONS``) and a ``register`` decorator beside it. The shipped pieces register
themselves the same way a user's module does::

    from vdm import schedules

    @schedules.register("my_schedule")
    class MySchedule(schedules.Schedule):
        ...

A config file that imports such a module (on ``PYTHONPATH``) can then name ``"my_schedule"``.

A registry is append-only: registering a name that is taken, or a piece that does not meet its
kind's contract (the ``contract`` function the kind's module gives its registry), raises
:class:`RegistrationError` at once and leaves the registry as it was. Nothing is ever replaced or
removed, so a name means one piece for the life of a process. (These tables are the one kind of
module-level state the package keeps: they only grow, by registration.)

Each registration may carry an ``example``: the small inputs its contract checks need (a data
shape, tiny constructor arguments, a function that writes a tiny data file). ``vdm.testing.check_piece``
runs the kind's checks on it, so a new piece needs no edit of the test suite.

An unknown name always reads ``unknown schedule 'quadratic'; valid names: fixed_linear, ...``
(:meth:`Registry.lookup`, and :func:`lookup` for the small fixed tables that are not registries).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistrationError(ValueError):
    """A piece could not be registered: its name is taken or invalid, or it does not meet its kind's contract.
    The message is one line naming the kind, the name and the problem."""


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered piece.

    Attributes:
        name: the name configs use.
        piece: what was registered (a class, a function, or the kind's own record of it).
        example: what the kind's contract checks (``vdm.testing``) need to try the piece; ``None`` takes the
            kind's default example.
        module: the module that registered it (named when the name is registered twice).
    """

    name: str
    piece: T
    example: Any = None
    module: str = ""


class Registry(Mapping[str, T]):
    """An append-only table ``name -> piece`` of one kind of piece, checked by the kind's contract.

    It reads as a mapping (``name in SCHEDULES``, ``sorted(SCHEDULES)``, ``SCHEDULES[name]``) whose values are
    the registered pieces; :meth:`entry` gives the whole :class:`Entry` (with its example).

    Args:
        kind: what the pieces are, for messages ("schedule", "weighting", ...).
        contract: ``contract(name, piece)`` raises ``TypeError`` or ``ValueError`` saying what the piece lacks;
            it runs at registration, before anything is added. ``None``: no check.
    """

    def __init__(self, kind: str, contract: Callable[[str, Any], None] | None = None):
        self.kind = kind
        self._contract = contract
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, piece: T | None = None, *, example: Any = None, module: str | None = None):
        """Add ``piece`` under ``name``; as a decorator when ``piece`` is left out.

        Args:
            name: the name a config gives (a non-empty string, not yet registered for this kind).
            piece: the piece; omitted, ``register`` returns a decorator that registers what it decorates and
                returns it unchanged.
            example: the inputs the kind's contract checks need (see the kind's module); ``None`` for its default.
            module: the registering module, for messages (default: the piece's ``__module__``).

        Returns:
            ``piece`` (or the decorator).

        Raises:
            RegistrationError: the name is taken or not a non-empty string, or the piece fails the contract.
        """
        def add(piece: T) -> T:
            if not isinstance(name, str) or not name or name != name.strip():
                raise RegistrationError(f"{self.kind} name {name!r}: must be a non-empty string without surrounding "
                                        "spaces")
            found = inspect.getmodule(piece)
            where = module or (found.__name__ if found is not None else "?")
            if name in self._entries:
                raise RegistrationError(f"{self.kind} {name!r} is already registered (by {self._entries[name].module}); "
                                        f"choose another name")
            if self._contract is not None:
                try:
                    self._contract(name, piece)
                except (TypeError, ValueError) as e:
                    raise RegistrationError(f"{self.kind} {name!r} does not meet the {self.kind} contract: {e}") from None
            self._entries[name] = Entry(name, piece, example, where)
            return piece

        return add if piece is None else add(piece)

    def entry(self, name: str) -> Entry[T]:
        """The :class:`Entry` registered as ``name`` (``ValueError`` naming the valid names if there is none)."""
        self.lookup(name)
        return self._entries[name]

    def lookup(self, name: str, error: type[Exception] = ValueError) -> T:
        """The piece registered as ``name``, or ``error`` naming the kind and every valid name."""
        return lookup(self, name, self.kind, error)

    def __getitem__(self, name: str) -> T:
        return self._entries[name].piece

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"


def parameters(fn: Callable, first: str | None = None, usage: str = "") -> list[inspect.Parameter]:
    """The parameters of ``fn``'s signature, for a contract to inspect.

    Args:
        fn: the callable.
        first: if given, the name its first parameter must have, taken positionally.
        usage: how the piece is called (``"w(logsnr, **params)"``), for the message.

    Raises:
        TypeError: the signature cannot be read (a builtin, an odd callable), naming ``fn``; or its first
            parameter is not the positional ``first``.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError) as e:
        raise TypeError(f"the signature of {fn!r} cannot be read ({e})") from None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if first is not None and (not params or params[0].name != first or params[0].kind not in positional):
        raise TypeError(f"its first parameter must be the positional {first!r} ({usage})")
    return params


def lookup(table: Mapping[str, T], name: str, kind: str, error: type[Exception] = ValueError) -> T:
    """``table[name]``, or ``error`` naming the ``kind`` of piece and every valid name.

    Args:
        table: a :class:`Registry` or a fixed mapping of names.
        name: the name to look up.
        kind: what the pieces are, for the message.
        error: the exception class raised for an unknown name.

    Returns:
        ``table[name]``.

    Raises:
        error: ``unknown <kind> <name>; valid names: ...``.
    """
    try:
        return table[name]
    except (KeyError, TypeError):
        raise error(f"unknown {kind} {name!r}; valid names: {', '.join(table)}") from None
