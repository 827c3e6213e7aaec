"""Arrays in ``.npz`` files: source ``npz``.

A directory with ``train.npz`` and ``test.npz``, each holding ``images`` (or
``x``) of shape ``[N, H, W]`` or ``[N, H, W, C]``, dtype ``uint8``, and
optionally integer ``labels`` (or ``y``).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vdm.data.core import ArraySource, DataNotFoundError, PathLike, check_split, fail, make_split


def _first_key(arrays: Mapping[str, Any], keys: Sequence[str]) -> str | None:
    return next((key for key in keys if key in arrays), None)


def read_npz(path: PathLike, *, vocab_size: int = 256) -> ArraySource:
    """Images from one ``.npz`` file: key ``images`` or ``x``, labels ``labels`` or ``y``."""
    path = os.fspath(path)
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


def load_npz(split: str, *, path: PathLike, vocab_size: int = 256) -> ArraySource:
    """``<path>/<split>.npz`` (see :func:`read_npz`)."""
    directory = os.fspath(path)
    if not os.path.isdir(directory):
        raise fail(directory, "no such directory", DataNotFoundError)
    return read_npz(os.path.join(directory, f"{check_split(split)}.npz"), vocab_size=vocab_size)
