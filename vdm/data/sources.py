"""The registry of data sources (:data:`SOURCES`), its ``register`` decorator and the source contract.

A data source is a *loader*: ``loader(split, **options) -> Split``, called with ``split`` ``"train"`` or
``"test"`` and the config's ``data.kwargs`` as keyword options, returning one split with random access
(:class:`Split`; subclass :class:`vdm.data.Source`, or build one with :func:`vdm.data.make_split`, to get
the protocol's defaults). A new source is a loader decorated with :func:`register`, in its own module::

    from vdm import data

    def write_tiny(tmpdir):            # the example its contract checks load: a tiny file, its options
        np.savez(tmpdir / "train.npz", images=np.zeros((3, 4, 4), np.uint8))
        np.savez(tmpdir / "test.npz", images=np.ones((2, 4, 4), np.uint8))
        return {"path": tmpdir}

    @data.register("my_source", example=write_tiny)
    def load_my_source(split, *, path):
        return data.read_npz(os.path.join(path, f"{split}.npz"))

A config names it (``config.data.source = "my_source"``) once the module is imported, and
``vdm.testing.check_piece("source", "my_source")`` runs the whole contract on its example
(:mod:`vdm.testing.source`). An option the source shares with the shipped ones (``path``, ``vocab_size``,
...) is checked by :data:`vdm.data.OPTIONS` before the loader runs; any other is checked by the loader.

Registration checks only what needs no data: that the loader is callable, that its first parameter is
``split`` (positional) and that every other one can be given by keyword (the config's options); the
example, when given, must be callable. Anything else is :class:`vdm.registry.RegistrationError`.
"""

from __future__ import annotations

import functools
import inspect
import pathlib
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import numpy as np

from vdm import registry


@runtime_checkable
class Split(Protocol):
    """What a loader returns: one split of a data set as a random-access source of records.

    Records are ``{"image": uint8 [H, W, C], "label": int32 scalar}`` ("label" iff ``has_labels``), pixel
    values in ``0 .. vocab_size - 1`` and labels in ``0 .. num_classes - 1``. :class:`vdm.data.Source`
    implements ``has_labels``, ``__getitems__`` and ``read_batch`` from the rest.

    Attributes:
        origin: where the data come from (a path, ``"tfds cifar10[train]"``), for messages.
        shape: ``(H, W, C)`` of every image.
        vocab_size: the number of pixel levels (2..256).
        num_classes: the number of classes; 0 when the records carry no label.
        kind: ``"image"``, or ``"points"`` for 2-D points stored as ``[1, 1, 2]`` images.
    """

    origin: str
    shape: tuple[int, int, int]
    vocab_size: int
    num_classes: int
    kind: str

    @property
    def has_labels(self) -> bool:
        """Whether the records carry a ``"label"``."""

    def __len__(self) -> int:
        """The number of records."""

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Record ``index``."""

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """The records at ``indices``."""

    def read_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The records at ``indices`` stacked: ``image [B, H, W, C]`` (and ``label [B]``)."""


class Loader(Protocol):
    """A data source: ``loader(split, **options) -> Split``.

    Args:
        split: ``"train"`` or ``"test"`` (a source may pass other names on, as ``tfds`` does).
        **options: the config's ``data.kwargs`` (``path=``, ``vocab_size=``, ...), each a keyword parameter.

    Returns:
        The split (:class:`Split`).

    Raises:
        vdm.data.DataError: one line naming the file (or the option) and the problem.
    """

    def __call__(self, split: str, /, **options: Any) -> Split: ...


class Example(Protocol):
    """What a source's contract checks load it with: ``example(tmpdir) -> options``.

    Args:
        tmpdir: an empty temporary directory (a ``pathlib.Path``) for the tiny data files it writes; it is
            removed after the checks.

    Returns:
        The loader's keyword options for those files (``{"path": tmpdir}``), or a context manager giving them
        that stays entered while the splits are loaded and read (e.g. a mock of a remote catalogue). An
        embedded source needs no file: its example returns ``{}`` (the default).

    Raises:
        unittest.SkipTest: an optional dependency the source needs is not installed.
    """

    def __call__(self, tmpdir: pathlib.Path, /) -> Mapping[str, Any] | AbstractContextManager[Mapping[str, Any]]: ...


def no_files(tmpdir: pathlib.Path) -> dict[str, Any]:
    """The default :class:`Example`: no file, no option (an embedded source)."""
    del tmpdir
    return {}


def contract(name: str, loader: Any) -> None:
    """The static part of the source contract, checked at registration (no data are read).

    Args:
        name: the source's name (for messages).
        loader: the loader to check (see :class:`Loader`).

    Raises:
        TypeError: the loader is not callable, its signature cannot be read, its first parameter is not a
            positional ``split``, or another parameter cannot be given by keyword.
    """
    del name
    if not callable(loader):
        raise TypeError(f"{loader!r} is not callable; a source is a function (split, **options) -> Split")
    params = registry.parameters(loader, "split", "loader(split, **options)")
    for p in params[1:]:
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            raise TypeError(f"its parameter {p.name!r} cannot be given by keyword; options are keyword arguments")


SOURCES: registry.Registry[Loader] = registry.Registry("data source", contract)
"""Source name -> ``loader(split, **options) -> Split``, filled by :func:`register`."""


def register(name: str, loader: Loader | None = None, *, example: Example | None = None):
    """Register ``loader`` as the data source ``name``; as a decorator when ``loader`` is left out.

    Args:
        name: the name ``config.data.source`` gives (not yet registered).
        loader: ``loader(split, **options) -> Split`` (:class:`Loader`); omitted, ``register`` returns a
            decorator that registers the function it decorates and returns it unchanged.
        example: ``example(tmpdir) -> options`` (:class:`Example`): writes tiny data files for the contract
            checks (``vdm.testing.source``) and gives the options that load them; ``None``: load with no
            option (an embedded source).

    Returns:
        ``loader`` (or the decorator).

    Raises:
        vdm.registry.RegistrationError: the name is taken, the loader fails :func:`contract`, or the example
            is not callable.
    """
    if example is not None and not callable(example):
        raise registry.RegistrationError(f"data source {name!r}: its example {example!r} is not callable; it is a "
                                         "function of a temporary directory returning the options")
    # A partial (a shortcut of a general loader) names the module of the function it wraps.
    module = loader.func.__module__ if isinstance(loader, functools.partial) else None
    return SOURCES.register(name, loader, example=example, module=module)
