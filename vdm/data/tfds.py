"""tensorflow-datasets, read lazily: sources ``tfds``, ``tfds_cifar10``, ``tfds_imagenet{32,64}``.

Optional extra ``vdm[tfds]``; TensorFlow is never required. A split is read
through ``tfds.data_source`` (array_record files, random access, no
TensorFlow) and wrapped in a :class:`TfdsSource` that decodes only the records
asked for: building it reads one record (to learn and check the image shape),
and a batch reads exactly its rows, so a data set larger than host memory
works.

Only for data sets prepared in a format without random access (e.g. TFRecord)
and only when TensorFlow is importable, the split is read through
``tfds.load`` instead and **materialised in memory** as an
:class:`~vdm.data.core.ArraySource`; without TensorFlow that case is a
:class:`~vdm.data.core.DataError` saying how to prepare array_record data.

The sources register themselves (:func:`vdm.data.register`): ``tfds`` (any data set, ``dataset=``) and its
shortcuts ``tfds_cifar10``, ``tfds_imagenet32``, ``tfds_imagenet64``. Their contract checks run offline, on
five records per split that ``tfds.testing.mock_data`` serves in place of the catalogue, and are skipped
where tensorflow-datasets is not installed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import operator
import os
import pathlib
import types
import unittest
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vdm.data.core import PathLike, Source, check_vocab, fail, make_split
from vdm.data.sources import register


def _import_tfds() -> Any:
    """The ``tensorflow_datasets`` module, or an ImportError saying how to get it."""
    try:
        return importlib.import_module("tensorflow_datasets")
    except ImportError as e:
        raise ImportError(
            "tensorflow-datasets is not installed; install it with: pip install 'vdm[tfds]'"
        ) from e


def _tensorflow_available() -> bool:
    try:
        importlib.import_module("tensorflow")
    except ImportError:
        return False
    return True


class TfdsSource(Source):
    """A lazily read tfds split: records are decoded on demand, nothing is kept in memory.

    Each record is normalised to ``{"image": uint8 [H, W, C], "label": int32}``
    (grayscale images stored without a channel axis get one). The label is
    kept when the data set's ``label_key`` feature is a ``tfds.features.ClassLabel``
    (``num_classes`` comes from it); otherwise records carry no label. The
    first record is read and checked when the source is built; every record
    read later is checked for dtype, shape, label range (and pixel range when
    ``vocab_size < 256``), which costs nothing next to decoding it.
    """

    kind = "image"

    def __init__(
        self,
        source: Sequence[Any],
        *,
        origin: str,
        image_key: str = "image",
        label_key: str = "label",
        vocab_size: int = 256,
        num_classes: int = 0,
    ):
        check_vocab(vocab_size, origin)
        self._source, self.origin = source, origin
        self._image_key, self._label_key = image_key, label_key
        self.vocab_size, self.num_classes = vocab_size, num_classes
        self._length = len(source)
        if self._length == 0:
            raise fail(origin, "has no examples")
        self.shape: tuple[int, int, int] | None = None
        self.shape = self[0]["image"].shape

    def __len__(self) -> int:
        return self._length

    def _record(self, example: Mapping[str, Any], index: int) -> dict[str, np.ndarray]:
        """Check and normalise one decoded tfds example."""
        if self._image_key not in example:
            raise fail(self.origin, f"record {index} has keys {sorted(example)}, no {self._image_key!r}")
        image = np.asarray(example[self._image_key])
        if image.ndim == 2:
            image = image[..., None]
        if image.dtype != np.uint8 or image.ndim != 3 or 0 in image.shape:
            raise fail(
                self.origin,
                f"record {index} has a {image.dtype} image of shape {image.shape}, "
                "expected uint8 [H, W] or [H, W, C]",
            )
        if self.shape is not None and image.shape != self.shape:
            raise fail(
                self.origin, f"record {index} has image shape {image.shape}, expected {self.shape}"
            )
        if self.vocab_size < 256 and int(image.max()) >= self.vocab_size:
            raise fail(
                self.origin,
                f"record {index}: pixel value {int(image.max())} is out of range "
                f"for vocab_size {self.vocab_size}",
            )
        record = {"image": image}
        if self.num_classes:
            if self._label_key not in example:
                raise fail(self.origin, f"record {index} has keys {sorted(example)}, no {self._label_key!r}")
            label = int(example[self._label_key])
            if not 0 <= label < self.num_classes:
                raise fail(
                    self.origin, f"record {index} has label {label}, expected 0..{self.num_classes - 1}"
                )
            record["label"] = np.int32(label)
        return record

    def _check_index(self, index: int) -> int:
        index = operator.index(index)
        if not 0 <= index < self._length:
            raise IndexError(f"{self.origin}: index {index} out of range for {self._length} records")
        return index

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = self._check_index(index)
        return self._record(self._source[index], index)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, np.ndarray]]:
        keys = [self._check_index(i) for i in indices]
        if not keys:
            return []
        getitems = getattr(self._source, "__getitems__", None)
        examples = getitems(keys) if getitems is not None else [self._source[k] for k in keys]
        if len(examples) != len(keys):
            raise fail(self.origin, f"returned {len(examples)} records for {len(keys)} keys")
        return [self._record(example, key) for example, key in zip(examples, keys)]


def _class_count(tfds: Any, source: Any, label_key: str) -> int:
    """``num_classes`` of the ``label_key`` ClassLabel feature of a tfds data source, else 0."""
    features = getattr(getattr(source, "dataset_info", None), "features", None)
    try:
        feature = features[label_key] if features is not None and label_key in features.keys() else None
    except (KeyError, TypeError, AttributeError):
        return 0
    if isinstance(feature, tfds.features.ClassLabel) and feature.num_classes:
        return int(feature.num_classes)
    return 0


def _stack_examples(
    examples: Iterable[Mapping[str, Any]], count: int, image_key: str, label_key: str, origin: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack ``count`` example dicts into images ``[N, ...]`` and labels (if present)."""
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    seen = 0
    for i, example in enumerate(examples):
        if image_key not in example:
            raise fail(origin, f"example {i} has keys {sorted(example)}, no {image_key!r}")
        image = np.asarray(example[image_key])
        if images is None:
            images = np.empty((count, *image.shape), dtype=image.dtype)
            labels = np.empty(count, np.int64) if label_key in example else None
        if image.shape != images.shape[1:]:
            raise fail(origin, f"example {i} has shape {image.shape}, expected {images.shape[1:]}")
        images[i] = image
        if labels is not None:
            labels[i] = example[label_key]
        seen = i + 1
    if images is None:
        raise fail(origin, "has no examples")
    if seen != count:
        raise fail(origin, f"yielded {seen} examples, expected {count}")
    return images, labels


def _tfds_load_numpy(tfds: Any, dataset: str, split: str, data_dir: Any, download: bool) -> list[Any]:
    """Every example of a split via ``tfds.load`` (needs TensorFlow), as numpy dicts."""
    ds = tfds.load(dataset, split=split, data_dir=data_dir, download=download)
    return list(tfds.as_numpy(ds))


@register("tfds", example=lambda tmpdir: _mock_example(tmpdir, (4, 4), dataset="mnist"))
def load_tfds(
    split: str,
    *,
    dataset: str,
    data_dir: PathLike | None = None,
    download: bool = False,
    image_key: str = "image",
    label_key: str = "label",
    vocab_size: int = 256,
    split_names: Mapping[str, str] | None = None,
) -> Source:
    """One split of a tensorflow-datasets image data set as a lazy random-access source.

    Reads through ``tfds.data_source`` (array_record; no TensorFlow) into a
    :class:`TfdsSource`. If the data were prepared in a format without random
    access and TensorFlow is importable, falls back to ``tfds.load`` and
    materialises the split in memory. ``split_names`` renames splits (e.g.
    ``{"test": "validation"}``); other split strings, including tfds slices
    such as ``"train[:10%]"``, pass through unchanged. ``download=True`` lets
    tfds download and prepare the data (as array_record) when absent.
    """
    tfds = _import_tfds()
    tfds_split = (split_names or {}).get(split, split)
    origin = f"tfds {dataset}[{tfds_split}]" + (f" in {os.fspath(data_dir)}" if data_dir else "")
    prepare = {"file_format": "array_record"} if download else None
    try:
        source = tfds.data_source(
            dataset,
            split=tfds_split,
            data_dir=data_dir,
            download=download,
            download_and_prepare_kwargs=prepare,
        )
    except NotImplementedError as e:
        if not _tensorflow_available():
            raise fail(
                origin,
                "no array_record data to read without TensorFlow (prepare the data set with "
                "file_format='array_record', pass download=True, or install tensorflow); "
                f"tfds said: {str(e).splitlines()[0]}",
            ) from e
        examples = _tfds_load_numpy(tfds, dataset, tfds_split, data_dir, download)
        images, labels = _stack_examples(examples, len(examples), image_key, label_key, origin)
        return make_split(images, labels, vocab_size=vocab_size, origin=origin)
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds for data that are absent or half prepared
        said = (str(e).strip().splitlines() or [""])[0]
        raise fail(origin, f"cannot open it ({type(e).__name__}: {said}); prepare it with "
                           f"tfds.builder({dataset!r}).download_and_prepare(file_format='array_record')") from e
    return TfdsSource(
        source,
        origin=origin,
        image_key=image_key,
        label_key=label_key,
        vocab_size=vocab_size,
        num_classes=_class_count(tfds, source, label_key),
    )



class _MockRecords(list):
    """Records as ``tfds.data_source`` serves them, with the catalogue's features (a 10-class label)."""

    def __init__(self, examples: list[dict[str, Any]], tfds: Any):
        super().__init__(examples)
        self.dataset_info = types.SimpleNamespace(features={"image": None,
                                                            "label": tfds.features.ClassLabel(num_classes=10)})


@contextlib.contextmanager
def _mock_example(tmpdir: pathlib.Path, shape: tuple[int, ...], **options: Any) -> Iterator[dict[str, Any]]:
    """The contract checks' input of a tfds source: five labelled records of ``shape`` per split, served by
    ``tfds.testing.mock_data`` (no catalogue, no network) while the checks run; ``options`` are the source's.

    Raises:
        unittest.SkipTest: tensorflow-datasets is not installed.
    """
    del tmpdir
    try:
        tfds = importlib.import_module("tensorflow_datasets")
    except ImportError:
        raise unittest.SkipTest("tensorflow-datasets is not installed (pip install 'vdm[tfds]')") from None

    def as_data_source(builder: Any, split: str, **kwargs: Any) -> _MockRecords:
        rng = np.random.default_rng(len(split))
        return _MockRecords([{"image": rng.integers(0, 256, shape, dtype=np.uint8), "label": np.int64(i % 10)}
                             for i in range(5)], tfds)

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        yield options


register("tfds_cifar10", functools.partial(load_tfds, dataset="cifar10"),
         example=lambda tmpdir: _mock_example(tmpdir, (32, 32, 3)))
register("tfds_imagenet32",
         functools.partial(load_tfds, dataset="downsampled_imagenet/32x32", split_names={"test": "validation"}),
         example=lambda tmpdir: _mock_example(tmpdir, (32, 32, 3)))
register("tfds_imagenet64",
         functools.partial(load_tfds, dataset="downsampled_imagenet/64x64", split_names={"test": "validation"}),
         example=lambda tmpdir: _mock_example(tmpdir, (64, 64, 3)))
