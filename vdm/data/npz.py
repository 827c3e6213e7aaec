"""Arrays in ``.npz`` files: source ``npz``.

A directory with ``train.npz`` and ``test.npz``, each holding ``images`` (or
``x``) of shape ``[N, H, W]`` or ``[N, H, W, C]``, dtype ``uint8``, and
optionally integer ``labels`` (or ``y``). A file that is not an ``.npz`` archive (a zip file) is
named as such before numpy reads it (numpy would take any other bytes for a pickle).
"""

from __future__ import annotations

import os
import pathlib
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vdm.data.core import ArraySource, DataNotFoundError, PathLike, check_split, fail, make_split
from vdm.data.sources import register


def _first_key(arrays: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((key for key in keys if key in arrays), None)


# How a file begins: an .npz is a zip archive (an empty one begins with the end record); a lone .npy array.
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"


def _check_is_npz(path: str) -> None:
    """A one-line DataError unless ``path`` is a file that begins as a zip archive (what every .npz is)."""
    if os.path.isdir(path):
        raise fail(path, "is a folder, not an .npz file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except FileNotFoundError as e:
        raise fail(path, "no such file", DataNotFoundError) from e
    except OSError as e:
        raise fail(path, f"cannot read ({e.strerror or e})") from e
    if head.startswith(_NPY_MAGIC):
        raise fail(path, "holds a single array (.npy), expected an .npz archive")
    if not head.startswith(_ZIP_MAGIC):
        found = "it is empty" if not head else f"it begins with bytes {head[:4].hex(' ')}, not a zip archive's 50 4b"
        raise fail(path, f"not an .npz file ({found}; numpy's savez writes zip archives)")


def read_npz(path: PathLike, *, vocab_size: int = 256) -> ArraySource:
    """Images from one ``.npz`` file: key ``images`` or ``x``, labels ``labels`` or ``y``.

    Args:
        path: the ``.npz`` file (``numpy.savez`` or ``savez_compressed``).
        vocab_size: the pixel levels; every value must lie below it.

    Returns:
        The split (:func:`vdm.data.make_split`): ``[N, H, W]`` images get a channel axis.

    Raises:
        DataNotFoundError: no such file.
        DataError: one line naming ``path``: not an .npz file (a zip archive), a damaged one, no ``images``/``x``
            array, or arrays that fail :func:`vdm.data.make_split`.
    """
    path = os.fspath(path)
    _check_is_npz(path)
    try:
        arrays = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise fail(path, "no such file", DataNotFoundError) from e
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise fail(path, f"not a readable .npz file ({type(e).__name__}: {e})") from e
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise fail(path, "holds a single array (.npy), expected an .npz archive")
    with arrays:
        image_key = _first_key(arrays, ("images", "x"))
        if image_key is None:
            raise fail(path, f"has arrays {sorted(arrays.files)}, expected 'images' or 'x'")
        label_key = _first_key(arrays, ("labels", "y"))
        try:
            images = arrays[image_key]
            labels = None if label_key is None else arrays[label_key]
        except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            raise fail(path, f"cannot read array {image_key!r} or its labels ({e})") from e
    return make_split(images, labels, vocab_size=vocab_size, origin=path)


def _example(tmpdir: pathlib.Path) -> dict:
    """The contract checks' input: ``train.npz`` (5 images of 4x4, with labels) and ``test.npz`` (3, without),
    17 pixel levels, in ``tmpdir``."""
    rng = np.random.default_rng(0)
    np.savez(tmpdir / "train.npz", images=rng.integers(0, 17, (5, 4, 4), dtype=np.uint8), labels=np.arange(5) % 3)
    np.savez(tmpdir / "test.npz", x=rng.integers(0, 17, (3, 4, 4), dtype=np.uint8))
    return {"path": tmpdir, "vocab_size": 17}


@register("npz", example=_example)
def load_npz(split: str, *, path: PathLike, vocab_size: int = 256) -> ArraySource:
    """``<path>/<split>.npz`` (see :func:`read_npz`)."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise fail(directory, "no such directory", DataNotFoundError)
    return read_npz(os.path.join(directory, f"{check_split(split)}.npz"), vocab_size=vocab_size)
