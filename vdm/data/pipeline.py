"""The grain input pipeline: training batches, evaluation batches, host sharding.

Both pipelines are grain ``MapDataset`` chains over record *positions*:

* training: ``range(N).shuffle(seed).repeat()``, the endless stream that visits
  the split once per epoch in a fresh order per epoch;
* evaluation: ``range(num_eval_batches(n, B) * B)``, one ordered pass padded to
  whole global batches.

:func:`host_shard` turns either stream into this host's batches of positions
(global batch ``k`` is stream positions ``[k*B, (k+1)*B)``; host ``p`` of ``P``
keeps rows ``[p*B/P, (p+1)*B/P)`` of it), and one ``map`` reads those records
from the source with a single batched read. Reading is the last step, so a host
reads only its own records. Iterators come from ``to_iter_dataset`` with
thread prefetching; random access (:func:`train_batch`) and the prefetching
iterator (:func:`train_batches`) index the very same ``MapDataset``.

Why positions and not ``MapDataset.source(source).batch(...)``: grain 0.2's
``MapDataset.batch`` fetches its elements one ``__getitem__`` at a time (its
batched-read push-down is an experiment that is switched off), which builds a
dict per record; batching positions and reading each host batch with one
``read_batch`` / ``__getitems__`` call is about 1.7x faster on in-memory data
(``python -m vdm.data.benchmark``) and lets a lazy source batch its I/O.

Cost: grain's shuffle computes every position with a scalar ``index_shuffle``
call plus per-element grain bookkeeping, about 12 us per training example on
one CPU core (~75k examples/s; numpy fancy indexing of a cached permutation is
~100x faster). The prefetching iterator runs it in threads, hidden behind a
device step that releases the GIL. The contract itself is in :mod:`vdm.data`.

Every entry point takes a :class:`vdm.data.Split` (what a registered source loads) and reads it through the
protocol alone; anything else with ``len`` and ``[i]`` (a list of records, a grain or tfds data source) is
wrapped once, at the entry, as one (:func:`as_split`).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from vdm.data.core import DataError, Source, stack_records
from vdm.data.sources import Split

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_count(name: str, value: Any, minimum: int = 0) -> int:
    if not _is_int(value) or value < minimum:
        kind = "positive" if minimum == 1 else "non-negative"
        raise DataError(f"{name} must be a {kind} integer, got {value!r}")
    return int(value)


def _check_layout(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validate the host layout; return the per-host batch size."""
    _check_count("global batch size", global_batch_size, minimum=1)
    if not (_is_int(process_index) and _is_int(process_count) and 0 <= process_index < process_count):
        raise DataError(f"process_index {process_index!r} is invalid for process_count {process_count!r}")
    if global_batch_size % process_count:
        raise DataError(
            f"global batch size {global_batch_size} is not divisible by process_count {process_count}"
        )
    return global_batch_size // process_count


class _Records(Source):
    """A random-access source of records that is not a :class:`Split` (a list of records, a grain or tfds data
    source), as one: the pipeline reads it as before it was wrapped.

    ``__getitems__`` is its own when it has one, else one ``[i]`` per record; ``shape``, ``has_labels`` and
    ``origin`` are its own when it declares them, else record 0's (read once, and only if asked) and the source
    itself. ``vocab_size``, ``num_classes`` and ``kind`` are its own, or ``None`` (the pipeline reads none of them).
    """

    def __init__(self, records: Any):
        self.records = records

    origin = property(lambda self: getattr(self.records, "origin", self.records))
    vocab_size = property(lambda self: getattr(self.records, "vocab_size", None))
    num_classes = property(lambda self: getattr(self.records, "num_classes", None))
    kind = property(lambda self: getattr(self.records, "kind", None))

    @functools.cached_property
    def _first(self) -> Mapping[str, Any]:
        return self.records[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self.records.shape if hasattr(self.records, "shape") else np.shape(self._first["image"])

    @property
    def has_labels(self) -> bool:
        return self.records.has_labels if hasattr(self.records, "has_labels") else "label" in self._first

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self.records[index]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        if hasattr(self.records, "__getitems__"):
            return self.records.__getitems__(indices)
        return [self.records[k] for k in indices]

    def read_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        return stack_records(self.__getitems__([int(i) for i in indices]))


def as_split(source: Any) -> Split:
    """``source`` as a :class:`vdm.data.Split`: itself if it is one (or a :class:`vdm.data.Source`), else wrapped.

    Args:
        source: a split (``vdm.data.load``, ``vdm.data.make_split``), or any random-access source of
            ``{"image", "label"}`` records (``len`` and ``[i]``; ``__getitems__`` used where it has one).

    Returns:
        A split whose ``read_batch``, ``shape`` and ``has_labels`` read ``source`` as the pipeline always has.

    Raises:
        DataError: ``source`` is a numpy array (images, not records: wrap them with ``make_split``).
    """
    if isinstance(source, np.ndarray):
        raise DataError(
            f"expected a source of {{'image', 'label'}} records (vdm.data.load), got a numpy array "
            f"of shape {source.shape}; wrap arrays with vdm.data.make_split(images, labels)"
        )
    return source if isinstance(source, (Source, Split)) else _Records(source)


def _check_source(source: Any) -> tuple[Split, int]:
    """``source`` as a split (:func:`as_split`) and its number of records; an empty split is an error."""
    split = as_split(source)
    count = len(split)
    if count == 0:
        raise DataError(f"cannot read batches from an empty split ({split.origin!r})")
    return split, count


def _check_train(
    count: int, global_batch_size: int, process_index: int, process_count: int, **counts: int
) -> None:
    """Validate a training request on a split of ``count`` (> 0) records."""
    _check_layout(global_batch_size, process_index, process_count)
    if global_batch_size > count:
        raise DataError(f"global batch size {global_batch_size} exceeds the {count} examples available")
    for name, value in counts.items():
        _check_count(name, value)


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def read_rows(source: Any, indices: Sequence[int] | np.ndarray) -> Batch:
    """The records at ``indices`` stacked into a batch, with one batched read: the split's ``read_batch``
    (a source that is not a split is read by its ``__getitems__``, else ``source[i]``: :func:`as_split`).
    """
    return as_split(source).read_batch(indices)


def _index_array(positions: Sequence[int]) -> np.ndarray:
    return np.asarray(positions, dtype=np.int64)


def host_shard(
    positions: grain.MapDataset, global_batch_size: int, *, process_index: int, process_count: int
) -> grain.MapDataset:
    """THE host-sharding rule, shared by training and evaluation.

    ``positions`` is a stream of record positions; global batch ``k`` is its
    elements ``[k*B, (k+1)*B)``. Element ``k`` of the result is host
    ``process_index``'s rows of global batch ``k``: the int64 array of stream
    elements ``[k*B + p*B/P, k*B + (p+1)*B/P)``. The union over hosts is the
    single-host batch, and nothing but those positions is computed.
    """
    per_host = _check_layout(global_batch_size, process_index, process_count)
    batched = positions.batch(per_host, drop_remainder=True, batch_fn=_index_array)
    return batched.slice(slice(process_index, None, process_count))


def _prefetching(ds: grain.MapDataset, prefetch: int) -> Iterator[Batch]:
    """Iterate ``ds`` in order, ``prefetch`` elements read ahead by as many threads."""
    options = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------


def _grain_seed(seed: int) -> int:
    """The 32-bit seed given to grain's shuffle for run seed ``seed``.

    grain shuffles epoch ``e`` with seed ``(s + e) mod 2**32``, so handing it
    the run seed itself would give run seed 6 the epoch orders of run seed 5
    one epoch early. Hashing the run seed first makes such overlaps as unlikely
    as any other 32-bit seed collision.
    """
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


def _train_positions(num_examples: int, seed: int) -> grain.MapDataset:
    """The endless training stream: the split shuffled afresh every epoch.

    ``shuffle`` before ``repeat``: a ``ShuffleMapDataset`` over ``N`` records
    asked for position ``i`` (``repeat`` passes positions past ``N`` through)
    permutes within epoch ``i // N`` with seed ``seed + i // N``. The other order
    is wrong: ``repeat(k).shuffle()`` mixes epochs (an example can come twice
    before another comes once), and after an endless ``repeat()`` grain's 32-bit
    ``index_shuffle`` is not even a permutation (``range(10).repeat().shuffle(seed=1)``
    starts 6, 3, 2, 9, 6, 9, 6, 9 in grain 0.2.18).
    """
    return grain.MapDataset.range(num_examples).shuffle(seed=_grain_seed(seed)).repeat()


def _train_dataset(
    split: Split, global_batch_size: int, seed: int, process_index: int, process_count: int
) -> grain.MapDataset:
    positions = host_shard(
        _train_positions(len(split), seed),
        global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return positions.map(split.read_batch)


def batch_indices(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    step: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """The record indices of this host's rows of global training batch ``step`` (int64 ``[B/P]``)."""
    if _check_count("num_examples", num_examples) == 0:
        raise DataError("cannot draw batches from an empty split (num_examples=0)")
    _check_train(num_examples, global_batch_size, process_index, process_count, seed=seed, step=step)
    shard = host_shard(
        _train_positions(num_examples, seed),
        global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    return shard[step]


def train_batch(
    source: Any,
    global_batch_size: int,
    *,
    seed: int,
    step: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Batch:
    """This host's rows of global training batch ``step``, a pure function of ``(seed, step)``.

    Returns ``{"image": uint8 [B/P, H, W, C], "label": int32 [B/P]}`` ("label"
    iff the source has labels). Reads only those ``B/P`` records.
    """
    split, count = _check_source(source)
    _check_train(count, global_batch_size, process_index, process_count, seed=seed, step=step)
    return _train_dataset(split, global_batch_size, seed, process_index, process_count)[step]


def train_batches(
    source: Any,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """:func:`train_batch` for steps ``start_step, start_step + 1, ...`` from a prefetching iterator.

    ``prefetch`` batches are read ahead by as many threads (0: read on demand).
    Resuming is ``train_batches(..., start_step=s)``: no iterator state to save.
    Returns a grain ``DatasetIterator``; ``close()`` it (or drop it) to stop its threads.
    """
    split, count = _check_source(source)
    _check_train(count, global_batch_size, process_index, process_count, seed=seed, start_step=start_step)
    _check_count("prefetch", prefetch)
    ds = _train_dataset(split, global_batch_size, seed, process_index, process_count)
    return _prefetching(ds[start_step:], prefetch)


# ----------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """How many batches :func:`eval_batches` yields for ``num_examples`` (the last may be padded)."""
    _check_count("global batch size", global_batch_size, minimum=1)
    return -(-_check_count("num_examples", num_examples) // global_batch_size)


def _padding(split: Split, per_host: int) -> Batch:
    """An all-padding host batch: zero images (and labels) of the split's record layout."""
    padding = {"image": np.zeros((per_host, *split.shape), np.uint8)}
    if split.has_labels:
        padding["label"] = np.zeros(per_host, np.int32)
    return padding


def _eval_rows(split: Split, count: int, padding: Mapping[str, np.ndarray], positions: np.ndarray) -> Batch:
    mask = positions < count
    batch = {key: value.copy() for key, value in padding.items()}
    if mask.any():
        rows = split.read_batch(positions[mask])
        for key in batch:
            batch[key][mask] = rows[key]
    batch["mask"] = mask
    return batch


def eval_batches(
    source: Any,
    global_batch_size: int,
    *,
    num_examples: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """One ordered pass over the first ``num_examples`` records (0 or more than the split: all).

    Global batch ``b`` holds records ``b*B .. b*B + B - 1``; positions past the
    end are padding rows (zero image and label) with ``mask == False``. Each
    host gets its rows of every global batch (:func:`host_shard`, as in
    training), so all hosts yield :func:`num_eval_batches` equally shaped
    batches ``{"image", "label" (iff labelled), "mask": bool [B/P]}``, and the
    masked rows of all hosts over all batches are every example exactly once.
    """
    per_host = _check_layout(global_batch_size, process_index, process_count)
    split, available = _check_source(source)
    count = min(_check_count("num_examples", num_examples) or available, available)
    _check_count("prefetch", prefetch)
    positions = grain.MapDataset.range(num_eval_batches(count, global_batch_size) * global_batch_size)
    shard = host_shard(positions, global_batch_size, process_index=process_index, process_count=process_count)
    read = functools.partial(_eval_rows, split, count, _padding(split, per_host))
    return _prefetching(shard.map(read), prefetch)
