"""Shared pieces of the data package: errors, random-access sources, containers, validation.

A *source* is one split of a data set with random access: ``len(source)``,
``source[i]`` and ``source.__getitems__([i, j, ...])`` return records
``{"image": uint8 [H, W, C], "label": int32 scalar}`` ("label" only when the
split has labels). That is grain's ``RandomAccessDataSource`` protocol, so a
source can also be handed to ``grain.MapDataset.source`` directly.
"""

from __future__ import annotations

import abc
import dataclasses
import gzip
import numbers
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vdm import registry
from vdm.options import OptionError

SPLITS = ("train", "test")
"""Split names understood by every source (``tfds`` also passes others on)."""

KINDS = ("image", "points")
"""What a data set's records are: images, or 2-D points stored as ``[1, 1, 2]`` "images"."""

PathLike = str | os.PathLike


class DataError(ValueError):
    """A data source is missing, malformed or misused; the message is one line."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A file or directory a data source needs does not exist."""


def fail(origin: object, problem: str, error: type[DataError] = DataError) -> DataError:
    """Build a one-line ``"<origin>: <problem>"`` error."""
    return error(f"{origin}: {' '.join(problem.split())}")


def check_name(name: str, valid: Iterable[str], what: str) -> str:
    """Return ``name`` if it is one of ``valid``, else raise the "unknown name; valid names" error."""
    registry.lookup(dict.fromkeys(valid), name, what, DataError)
    return name


def check_vocab_size(option: str, value: Any) -> None:
    """The pixel levels of a source: an integer in 2..256 (``vdm.options.OptionError`` if not)."""
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and 2 <= value <= 256):
        raise OptionError(option, value, "must be an integer in 2..256")


def check_path(option: str, value: Any, *, optional: bool = False) -> None:
    """A file or directory option: a string or ``os.PathLike`` (or None where ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise OptionError(option, value, "must be a path" + (" or None" if optional else ""))


def check_split_names(option: str, value: Any) -> None:
    """None, or a mapping of split names to the source's own (``{"test": "validation"}``), strings."""
    if value is None:
        return
    if not (hasattr(value, "items") and all(isinstance(k, str) and isinstance(v, str) and v for k, v in value.items())):
        raise OptionError(option, value, "must map split names to the source's split names (strings)")


def check_vocab(vocab_size: Any, origin: object) -> None:
    """:func:`check_vocab_size` as a :class:`DataError` naming ``origin``."""
    try:
        check_vocab_size("vocab_size", vocab_size)
    except OptionError as e:
        raise fail(origin, str(e)) from None


def check_split(split: str) -> str:
    return check_name(split, SPLITS, "split")


def read_bytes(path: PathLike) -> bytes:
    """Read a file, transparently gunzipping it when it starts with the gzip magic."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise fail(path, "no such file", DataNotFoundError) from e
    except OSError as e:
        raise fail(path, f"cannot read ({e.strerror or e})") from e
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise fail(path, f"corrupt gzip data ({e})") from e


# ----------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------


def stack_records(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Stack records into a batch: ``image`` uint8 ``[B, H, W, C]``, ``label`` int32 ``[B]``."""
    if not records:
        raise ValueError("cannot stack an empty list of records")
    batch = {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]}
    if "label" in batch:
        batch["label"] = batch["label"].astype(np.int32, copy=False)
    return batch


class Source(abc.ABC):
    """One split of a data set as a random-access source of records (the :class:`vdm.data.Split` protocol).

    A subclass gives ``__len__``, ``__getitem__`` and the attributes; ``has_labels``, ``__getitems__`` and
    ``read_batch`` have defaults built on them.

    Attributes (set by subclasses):
      origin: where the data come from (a path, ``"tfds cifar10[train]"``, ...),
        used in error messages.
      shape: ``(H, W, C)`` of every image.
      vocab_size: pixel values lie in ``0 .. vocab_size - 1``.
      num_classes: labels lie in ``0 .. num_classes - 1``; 0 when this split's
        records carry no label.
      kind: ``"image"`` or ``"points"`` (see :data:`KINDS`).
    """

    origin: str
    shape: tuple[int, int, int]
    vocab_size: int
    num_classes: int
    kind: str

    @property
    def has_labels(self) -> bool:
        return self.num_classes > 0

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        """The records at ``indices`` (one batched read where the storage allows it)."""
        return [self[i] for i in indices]

    def _getitems(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        # grain's hook for batched reads (SupportsBatchedReadRandomAccessDataSource).
        return self.__getitems__(indices)

    def read_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        """The records at ``indices`` stacked: ``image [B, H, W, C]`` (and ``label [B]``)."""
        indices = [int(i) for i in indices]
        if not indices:
            batch = {"image": np.zeros((0, *self.shape), np.uint8)}
            if self.has_labels:
                batch["label"] = np.zeros(0, np.int32)
            return batch
        return stack_records(self.__getitems__(indices))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.origin}, {len(self)} x {self.shape}, "
            f"vocab_size={self.vocab_size}, num_classes={self.num_classes}, kind={self.kind!r})"
        )


class ArraySource(Source):
    """An in-memory split backed by numpy arrays (``__getitems__`` fancy-indexes).

    Attributes:
      images: read-only ``uint8`` array ``[N, H, W, C]``.
      labels: read-only ``int32`` array ``[N]``, or ``None``.

    Build one with :func:`make_split`, which validates the arrays.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        *,
        vocab_size: int,
        num_classes: int,
        kind: str,
        origin: str,
    ):
        self.images, self.labels = images, labels
        self.shape = tuple(int(d) for d in images.shape[1:])
        self.vocab_size, self.num_classes, self.kind, self.origin = vocab_size, num_classes, kind, origin

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        record = {"image": self.images[index]}
        if self.labels is not None:
            record["label"] = self.labels[index]
        return record

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        batch = self.read_batch(indices)
        return [{key: value[i] for key, value in batch.items()} for i in range(len(indices))]

    def read_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        batch = {"image": self.images[index]}
        if self.labels is not None:
            batch["label"] = self.labels[index]
        return batch


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def make_split(
    images: Any,
    labels: Any = None,
    *,
    vocab_size: int = 256,
    num_classes: int | None = None,
    kind: str = "image",
    origin: object = "images",
) -> ArraySource:
    """Validate images (and labels) and wrap them in an :class:`ArraySource`.

    ``[N, H, W]`` images get a trailing channel axis. ``num_classes`` defaults
    to ``max(labels) + 1`` (0 without labels). Raises :class:`DataError`
    naming ``origin`` if the dtype is not ``uint8``, the rank is wrong, the set
    is empty, a value is ``>= vocab_size``, the label count differs or a label
    is outside ``0 .. num_classes - 1``. The whole array is checked.
    """
    check_name(kind, KINDS, "data kind")
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise fail(origin, f"images have dtype {images.dtype}, expected uint8")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise fail(origin, f"images have shape {images.shape}, expected [N, H, W] or [N, H, W, C]")
    if images.shape[0] == 0 or 0 in images.shape[1:]:
        raise fail(origin, f"images have shape {images.shape}, which holds no pixels")
    check_vocab(vocab_size, origin)
    top = int(images.max())
    if top >= vocab_size:
        raise fail(origin, f"pixel value {top} is out of range for vocab_size {vocab_size}")
    if labels is None:
        num_classes = 0
    else:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise fail(
                origin,
                f"labels have shape {labels.shape} and dtype {labels.dtype}, "
                f"expected {images.shape[0]} integers",
            )
        low, high = int(labels.min()), int(labels.max())
        if num_classes is None:
            num_classes = high + 1
        if low < 0 or high >= num_classes or num_classes > np.iinfo(np.int32).max:
            raise fail(origin, f"labels span {low}..{high}, expected 0..{num_classes - 1}")
        labels = _read_only(labels.astype(np.int32))
    return ArraySource(
        _read_only(images),
        labels,
        vocab_size=vocab_size,
        num_classes=num_classes,
        kind=kind,
        origin=str(origin),
    )


# ----------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set.

    Attributes:
      name: the source name (or the tfds data set name).
      shape: ``(H, W, C)`` of every record's image.
      vocab_size: pixel values lie in ``0 .. vocab_size - 1``.
      num_train, num_test: split sizes.
      num_classes: labels lie in ``0 .. num_classes - 1``; 0 when the data set
        has no labels.
      kind: ``"image"``, or ``"points"`` for 2-D point sets stored as
        ``[1, 1, 2]`` images (drawn as scatter plots, not image grids).
    """

    name: str
    shape: tuple[int, int, int]  # (H, W, C)
    vocab_size: int
    num_train: int
    num_test: int
    num_classes: int = 0
    kind: str = "image"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Both splits of a data set (random-access sources) and its :class:`DatasetInfo`."""

    info: DatasetInfo
    train: Source
    test: Source


def make_dataset(name: str, train: Source, test: Source, *, dataset: str | None = None) -> Dataset:
    """Both splits of a source and the :class:`DatasetInfo` they describe, checked to agree.

    Args:
        name: the source's name, for messages (and the info's name when ``dataset`` is None).
        train, test: the splits (``loader("train", ...)``, ``loader("test", ...)``).
        dataset: the data set's own name where the source reads several (``tfds``'s ``dataset=``).

    Returns:
        The :class:`Dataset`; ``num_classes`` is the larger of the splits' (a test split may lack labels).

    Raises:
        DataError: the splits' shape, ``vocab_size`` or kind differ (one line naming both).
    """
    if (train.shape, train.vocab_size, train.kind) != (test.shape, test.vocab_size, test.kind):
        raise DataError(
            f"{name}: train {train.shape} / vocab {train.vocab_size} / {train.kind} and "
            f"test {test.shape} / vocab {test.vocab_size} / {test.kind} disagree"
        )
    info = DatasetInfo(
        name=dataset or name,
        shape=train.shape,
        vocab_size=train.vocab_size,
        num_train=len(train),
        num_test=len(test),
        num_classes=max(train.num_classes, test.num_classes),
        kind=train.kind,
    )
    return Dataset(info=info, train=train, test=test)


# ----------------------------------------------------------------------------
# Held-out test sets for data shipped without one
# ----------------------------------------------------------------------------


def stratified_test_mask(labels: np.ndarray, every: int = 10) -> np.ndarray:
    """Bool mask selecting, within each class in order, every ``every``-th example.

    Positions ``every - 1, 2 * every - 1, ...`` of each class's examples (in
    array order) are True: a fixed, label-balanced held-out set.
    """
    labels = np.asarray(labels)
    mask = np.zeros(labels.shape[0], dtype=bool)
    for value in np.unique(labels):
        mask[np.flatnonzero(labels == value)[every - 1 :: every]] = True
    return mask


def holdout(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Select the ``split`` part of a set shipped without a test split (see :func:`stratified_test_mask`)."""
    is_test = stratified_test_mask(labels)
    keep = is_test if check_split(split) == "test" else ~is_test
    return images[keep], labels[keep]
