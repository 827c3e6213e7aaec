"""The contract checks of a data source (``vdm.data``): run on every registered one by the suite.

A source is a loader ``loader(split, **options) -> Split`` (:class:`vdm.data.Loader`). Its registration's
``example`` (:class:`vdm.data.Example`; ``None``: no file, no option) writes tiny data files into a
temporary directory and gives the options that load them. On those, the source must

- meet the static contract (callable, ``split`` first, options by keyword) and take options that pass
  :data:`vdm.data.OPTIONS`' checks;
- load both splits, ``train`` and ``test``, each a :class:`vdm.data.Split` with records;
- describe them consistently: ``shape`` three positive sizes (``[1, 1, C]`` for points), ``vocab_size``
  in 2..256, a known ``kind``, ``num_classes >= 0``, and the same shape, ``vocab_size`` and kind in both
  splits (:func:`vdm.data.make_dataset`, whose :class:`vdm.data.DatasetInfo` the records are held to);
- give records of ``{"image"}`` or ``{"image", "label"}`` (``label`` iff ``has_labels``), each image a
  ``uint8`` numpy array of the info's shape (*record shape*, *record dtype*), pixel values below
  ``vocab_size`` (*pixel levels*), each label an int32 scalar in ``0 .. num_classes - 1`` (*labels*);
- read the same record by ``source[i]``, ``__getitems__`` and ``read_batch`` (*random access*).

Records are read at up to :data:`RECORDS` positions spread over each split (the first and the last among
them), so a lazily read source is not read whole.
"""
from __future__ import annotations

import contextlib
import numbers
import pathlib
import tempfile
import unittest
from collections.abc import Mapping
from typing import Any

import numpy as np

from vdm import data, testing
from vdm.data import sources

RECORDS = 16  # records read per split, spread from the first to the last


def check(name: str, piece: data.Loader, example: data.Example | None) -> None:
    """Run every check of the source contract on ``piece`` (see the module's docstring).

    Args:
        name: its name, for messages.
        piece: the loader (what ``vdm.data.SOURCES`` holds).
        example: ``example(tmpdir) -> options`` (or a context manager giving them); ``None``: no option.

    Raises:
        AssertionError: ``source '<name>' fails <check>: <what was found>``.
        unittest.SkipTest: the example needs an optional dependency that is not installed.
    """
    checking = testing.checker("source", name)

    with checking("the static contract"):
        sources.contract(name, piece)
    with tempfile.TemporaryDirectory(prefix="vdm-source-") as tmp, contextlib.ExitStack() as stack:
        try:  # not inside checking(): an example's unittest.SkipTest (a missing optional dependency) skips
            made = (example or sources.no_files)(pathlib.Path(tmp))
            options = stack.enter_context(made) if isinstance(made, contextlib.AbstractContextManager) else made
        except unittest.SkipTest:
            raise
        except Exception as e:  # the example itself is broken: named as checking() names a failure
            raise AssertionError(f"source {name!r} fails its example: {type(e).__name__}: {e}") from e
        with checking("its example"):
            assert isinstance(options, Mapping), f"the example gives {type(options).__name__}, not the options"
        with checking("its example's options"):
            data.check_options(options)
        splits = {}
        for split in data.SPLITS:
            with checking(f"loading its {split} split"):
                splits[split] = piece(split, **options)
                assert isinstance(splits[split], data.Split), \
                    f"it gives a {type(splits[split]).__name__}, not a vdm.data.Split"
                assert len(splits[split]) > 0, "it holds no records"
        for split, source in splits.items():
            with checking(f"the description of its {split} split"):
                _check_description(source)
        with checking("the agreement of its splits"):
            info = data.make_dataset(name, splits["train"], splits["test"]).info
        for split, source in splits.items():
            _check_records(checking, split, source, info)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_description(source: data.Split) -> None:
    shape = source.shape
    assert isinstance(shape, tuple) and len(shape) == 3 and all(_is_int(d) and d > 0 for d in shape), \
        f"shape {shape!r} is not (H, W, C) of positive ints"
    assert _is_int(source.vocab_size) and 2 <= source.vocab_size <= 256, \
        f"vocab_size {source.vocab_size!r} is not an int in 2..256"
    assert source.kind in data.KINDS, f"kind {source.kind!r} is not one of {', '.join(data.KINDS)}"
    assert source.kind != "points" or shape[:2] == (1, 1), f"points are stored as [1, 1, C], not {list(shape)}"
    assert _is_int(source.num_classes) and source.num_classes >= 0, \
        f"num_classes {source.num_classes!r} is not an int >= 0"
    assert source.has_labels == (source.num_classes > 0), \
        f"has_labels is {source.has_labels} with num_classes {source.num_classes}"


def _check_records(checking, split: str, source: data.Split, info: data.DatasetInfo) -> None:
    n = len(source)
    keys = sorted({round(k) for k in np.linspace(0, n - 1, min(n, RECORDS))})
    with checking(f"random access ({split} split)"):
        singly = [source[k] for k in keys]
        batched = source.__getitems__(keys)
        stacked = source.read_batch(keys)
        assert len(batched) == len(keys), f"__getitems__ gives {len(batched)} records for {len(keys)} keys"
        for i, key in enumerate(keys):
            for record in (batched[i], {k: v[i] for k, v in stacked.items()}):
                assert set(record) == set(singly[i]), f"record {key} has keys {sorted(record)} and {sorted(singly[i])}"
                for k in record:
                    assert np.array_equal(record[k], singly[i][k]), f"record {key}'s {k!r} differs between reads"
    with checking(f"record keys ({split} split)"):
        expected = {"image", "label"} if source.has_labels else {"image"}
        for key, record in zip(keys, singly):
            assert set(record) == expected, f"record {key} has keys {sorted(record)}, expected {sorted(expected)}"
    with checking(f"record dtype ({split} split)"):
        for key, record in zip(keys, singly):
            image = record["image"]
            assert isinstance(image, np.ndarray) and image.dtype == np.uint8, \
                f"record {key}'s image is a {type(image).__name__} of {np.asarray(image).dtype}, expected uint8"
    with checking(f"record shape ({split} split)"):
        for key, record in zip(keys, singly):
            assert record["image"].shape == info.shape, \
                f"record {key}'s image is {record['image'].shape}, the data set's shape is {info.shape}"
    with checking(f"pixel levels ({split} split)"):
        for key, record in zip(keys, singly):
            top = int(record["image"].max())
            assert top < info.vocab_size, f"record {key} has pixel value {top}, vocab_size is {info.vocab_size}"
    if source.has_labels:
        with checking(f"labels ({split} split)"):
            assert source.num_classes <= info.num_classes
            for key, record in zip(keys, singly):
                label = np.asarray(record["label"])
                assert label.dtype == np.int32 and label.shape == (), \
                    f"record {key}'s label is {label.dtype} of shape {label.shape}, expected an int32 scalar"
                assert 0 <= int(label) < source.num_classes, \
                    f"record {key} has label {int(label)}, num_classes is {source.num_classes}"
