"""CIFAR-10 in either official distribution: source ``cifar10_files``.

python (``cifar-10-python.tar.gz`` or its ``cifar-10-batches-py/`` directory of
pickled ``data_batch_1..5`` and ``test_batch``) or binary
(``cifar-10-binary.tar.gz`` or ``cifar-10-batches-bin/``), given as the
archive, the extracted directory, or a directory that contains either.
Pickles are read with an unpickler that only admits the numpy globals a CIFAR
batch needs, so a hostile file cannot run code. The source's contract checks load a tiny binary
distribution (two images per batch) written into a temporary directory.
"""

from __future__ import annotations

import bz2
import dataclasses
import io
import lzma
import os
import pathlib
import pickle
import re
import tarfile
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from vdm.data.core import (
    SPLITS,
    ArraySource,
    DataNotFoundError,
    PathLike,
    check_split,
    fail,
    make_split,
    read_bytes,
)
from vdm.data.sources import register

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
        raise fail(origin, f"not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise fail(origin, f"holds a {type(batch).__name__}, expected a dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise fail(origin, f"has keys {sorted(batch)}, expected 'data' and 'labels'")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise fail(origin, f"data is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    if labels.shape != (data.shape[0],):
        raise fail(origin, f"has {labels.size} labels for {data.shape[0]} images")
    return _chw_to_hwc(data), labels.astype(np.int64)


def decode_cifar_binary(
    raw: bytes, origin: object = "CIFAR batch"
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one binary-version CIFAR-10 batch (records of 1 label + 3072 CHW bytes)."""
    record = 1 + _CIFAR_PIXELS
    if not raw or len(raw) % record:
        raise fail(origin, f"size {len(raw)} is not a positive multiple of {record}-byte records")
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
            name: (os.path.join(path, name), read_bytes(os.path.join(path, name)))
            for name in sorted(os.listdir(path))
            if _wanted(split, name) and os.path.isfile(os.path.join(path, name))
        }
    raw = _decompressed(path, read_bytes(path))
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
            members = list(tar)
            # tarfile ends quietly at a damaged header after the first: all that follows must be padding.
            if any(raw[tar.offset:]):
                raise fail(path, f"damaged tar header at byte {tar.offset} after {len(members)} member(s): "
                                 "the archive is corrupt")
            return {
                os.path.basename(member.name): (
                    f"{path}:{member.name}",
                    tar.extractfile(member).read(),
                )
                for member in members
                if member.isfile() and _wanted(split, os.path.basename(member.name))
            }
    except (tarfile.TarError, OSError, EOFError) as e:
        raise fail(path, f"unreadable tar archive ({e})") from e


# gzip is undone by read_bytes; tarfile would end quietly inside these two when they are cut short.
_COMPRESSIONS = ((b"BZh", bz2.decompress, "bzip2"), (b"\xfd7zXZ\x00", lzma.decompress, "xz"))


def _decompressed(path: str, raw: bytes) -> bytes:
    """The tar bytes of a bzip2 or xz archive (gzip is already undone); a truncated stream is an error."""
    for magic, decompress, name in _COMPRESSIONS:
        if raw.startswith(magic):
            try:
                return decompress(raw)
            except (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
                raise fail(path, f"damaged {name} stream ({type(e).__name__}: {e}): the archive is truncated "
                                 "or corrupt") from e
    return raw


def _cifar_root(path: str) -> str:
    """Resolve a user path to the batch directory or archive to read."""
    if not os.path.exists(path):
        raise fail(path, "no such file or directory", DataNotFoundError)
    if os.path.isdir(path) and not any(
        _wanted(split, name) for name in os.listdir(path) for split in SPLITS
    ):
        for fmt in _CIFAR_FORMATS:
            for candidate in (fmt.directory, fmt.archive):
                if os.path.exists(os.path.join(path, candidate)):
                    return os.path.join(path, candidate)
    return path


TRAIN_BATCHES = 5  # data_batch_1 .. data_batch_5 in the official release


def _example(tmpdir: pathlib.Path) -> dict:
    """The contract checks' input: the binary layout (label byte + CHW pixels per record), 2 images in each of
    the five training batches and 3 in the test batch, written into ``tmpdir/cifar-10-batches-bin``."""
    rng = np.random.default_rng(0)
    directory = tmpdir / "cifar-10-batches-bin"
    directory.mkdir()
    for name, count in [(f"data_batch_{k}.bin", 2) for k in range(1, TRAIN_BATCHES + 1)] + [("test_batch.bin", 3)]:
        labels = rng.integers(0, 10, (count, 1), dtype=np.uint8)
        (directory / name).write_bytes(np.concatenate([labels, rng.integers(0, 256, (count, _CIFAR_PIXELS),
                                                                             dtype=np.uint8)], axis=1).tobytes())
    return {"path": directory}


@register("cifar10_files", example=_example)
def load_cifar10_files(split: str, *, path: PathLike) -> ArraySource:
    """CIFAR-10 from the official python or binary distribution at ``path``.

    ``path`` may be ``cifar-10-{python,binary}.tar.gz``, the extracted
    ``cifar-10-batches-{py,bin}/`` directory, or a directory containing one of
    them. ``train`` concatenates ``data_batch_1..5`` (the official release; a
    folder with any of the five missing is refused); ``test`` is ``test_batch``. Images are
    returned HWC, ``[N, 32, 32, 3]``.
    """
    root = _cifar_root(os.fspath(path))
    files = _cifar_files(root, check_split(split))
    for fmt in _CIFAR_FORMATS:
        pattern = getattr(fmt, split)
        batches = sorted(
            (order, name) for name in files if (order := _batch_order(pattern, name)) is not None
        )
        if batches:
            orders = [order for order, _ in batches]
            release = list(range(1, TRAIN_BATCHES + 1))
            if split == "train" and orders != release:
                missing, extra = [k for k in release if k not in orders], [k for k in orders if k not in release]
                problem = (f"not data_batch_{', '.join(map(str, missing))}: the data are incomplete" if missing else
                           f"also data_batch_{', '.join(map(str, extra))}: the release has {TRAIN_BATCHES}")
                raise fail(root, f"has data_batch_{', '.join(map(str, orders))} but {problem}")
            decoded = [fmt.decode(files[name][1], files[name][0]) for _, name in batches]
            images = np.concatenate([images for images, _ in decoded])
            labels = np.concatenate([labels for _, labels in decoded])
            return make_split(images, labels, num_classes=10, origin=root)
    expected = "data_batch_<k>[.bin]" if split == "train" else "test_batch[.bin]"
    raise fail(root, f"no CIFAR-10 {split} batches ({expected}) found", DataNotFoundError)
