"""MNIST-format idx files (MNIST, Fashion-MNIST, KMNIST, ...): source ``mnist_idx``.

A directory with ``train-images-idx3-ubyte`` and ``t10k-images-idx3-ubyte``
(each optionally ``.gz``), plus the matching ``*-labels-idx1-ubyte[.gz]`` files
when present. ``split="test"`` reads the ``t10k`` files. :func:`write_idx` writes the format (the
source's contract checks load a tiny directory it writes).
"""

from __future__ import annotations

import gzip
import math
import os
import pathlib
from types import MappingProxyType

import numpy as np

from vdm.data.core import ArraySource, DataNotFoundError, PathLike, check_split, fail, make_split, read_bytes
from vdm.data.sources import register


def read_idx(path: PathLike) -> np.ndarray:
    """Read an unsigned-byte idx file (MNIST format), gzipped or not.

    The header is the big-endian magic ``0x000008DD`` (``DD`` = number of
    dimensions), then ``DD`` big-endian uint32 sizes, then exactly
    ``prod(sizes)`` bytes of data.
    """
    raw = read_bytes(path)
    if len(raw) < 4:
        raise fail(path, f"truncated idx header ({len(raw)} bytes)")
    magic = int.from_bytes(raw[:4], "big")
    ndim = raw[3]
    if magic >> 8 != 0x08 or ndim == 0:
        raise fail(path, f"bad idx magic 0x{magic:08x}, expected 0x000008NN (unsigned bytes)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise fail(path, f"truncated idx header ({len(raw)} of {header} bytes)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = header + math.prod(shape)
    if len(raw) != expected:
        problem = "truncated" if len(raw) < expected else "has trailing bytes"
        raise fail(path, f"{problem}: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape).copy()


def write_idx(path: PathLike, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` (unsigned bytes, any rank 1..255) as an idx file, gzipped when ``compress``.

    The inverse of :func:`read_idx`: magic ``0x000008DD``, the big-endian uint32 sizes, the bytes.

    Raises:
        ValueError: the array is not ``uint8`` or has no axis.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(f"idx files hold uint8 arrays of rank 1..255, got {array.dtype} of shape {array.shape}")
    header = (0x0800 | array.ndim).to_bytes(4, "big") + np.asarray(array.shape, ">u4").tobytes()
    payload = header + np.ascontiguousarray(array).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(payload, mtime=0) if compress else payload)


def _example(tmpdir: pathlib.Path) -> dict:
    """The contract checks' input: 6 train and 4 test images of 5x3 with labels (gzipped), in ``tmpdir``."""
    rng = np.random.default_rng(0)
    for prefix, count in (("train", 6), ("t10k", 4)):
        write_idx(tmpdir / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (count, 5, 3), dtype=np.uint8))
        write_idx(tmpdir / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, count, dtype=np.uint8), compress=True)
    return {"path": tmpdir}


def _find_idx(directory: str, stem: str) -> str | None:
    """``directory/stem`` or ``directory/stem.gz``, whichever exists, else None."""
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


_MNIST_PREFIX = MappingProxyType({"train": "train", "test": "t10k"})


@register("mnist_idx", example=_example)
def load_mnist_idx(split: str, *, path: PathLike) -> ArraySource:
    """MNIST (or Fashion-MNIST, KMNIST, ...) idx files from directory ``path``."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise fail(directory, "no such directory", DataNotFoundError)
    prefix = _MNIST_PREFIX[check_split(split)]
    image_stem = f"{prefix}-images-idx3-ubyte"
    image_path = _find_idx(directory, image_stem)
    if image_path is None:
        missing = os.path.join(directory, image_stem)
        raise fail(f"{missing}[.gz]", "no such file", DataNotFoundError)
    images = read_idx(image_path)
    if images.ndim != 3:
        raise fail(image_path, f"has shape {images.shape}, expected [N, H, W] images")
    label_path = _find_idx(directory, f"{prefix}-labels-idx1-ubyte")
    labels = None if label_path is None else read_idx(label_path)
    if labels is not None and labels.shape != images.shape[:1]:
        raise fail(label_path, f"has shape {labels.shape}, expected ({images.shape[0]},) labels")
    return make_split(images, labels, origin=image_path)
