"""Images in a folder of PNG files: what a user brings for its bits/dim per image (``vdm.image_bpd``).

Every ``*.png`` directly in the folder, in name order, read as 8-bit grey (``channels=1``) or RGB
(``channels=3``) without any resizing or colour conversion that would change a pixel: a grey image
saved as RGB (R = G = B) is read as grey, but a coloured one is refused, as are transparency,
16-bit files and files of different sizes. Every problem is one ``DataError`` line naming the file.

Other files in the folder (a README, a ``.jpg``) are not read, and not silently: :func:`skipped_note` is
the one line ``--mode score`` prints naming how many and which (an error would make a user clean a folder
that a camera or an export tool filled; the note says exactly which files have no score, and the CSV names
each file that has one). Hidden files (``.DS_Store``) are passed over without a word.
"""

from __future__ import annotations

import os

import numpy as np

from vdm.data.core import ArraySource, DataNotFoundError, PathLike, fail, make_split


def _files(folder: str) -> tuple[list[str], list[str]]:
    """(the ``*.png`` files, the other files but hidden ones) directly in ``folder``, each in name order."""
    if not os.path.isdir(folder):
        raise fail(folder, "no such folder", DataNotFoundError)
    files = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    return ([n for n in files if n.lower().endswith(".png")],
            [n for n in files if not n.lower().endswith(".png") and not n.startswith(".")])


def png_files(path: PathLike) -> list[str]:
    """The ``*.png`` files directly in the folder ``path``, in name order.

    Raises:
        DataNotFoundError: no such folder.
        DataError: it holds no ``.png`` file.
    """
    folder = os.fspath(path)
    names, _ = _files(folder)
    if not names:
        raise fail(folder, "holds no .png files")
    return names


SKIPPED_NAMED = 5  # the note names this many of the files it skips, then counts the rest


def skipped_note(path: PathLike) -> str | None:
    """The one line naming the files in the folder ``path`` that are not read (not ``*.png``, not hidden).

    Args:
        path: the folder of PNG files.

    Returns:
        ``"<folder>: 2 files are not .png and not read: notes.txt, photo.jpg"`` (the first
        :data:`SKIPPED_NAMED` names, then how many more), or None when every file is read.

    Raises:
        DataNotFoundError: no such folder.
    """
    folder = os.fspath(path)
    _, others = _files(folder)
    if not others:
        return None
    named = ", ".join(others[:SKIPPED_NAMED]) + (f" and {len(others) - SKIPPED_NAMED} more"
                                                  if len(others) > SKIPPED_NAMED else "")
    count = f"{len(others)} files are" if len(others) > 1 else "1 file is"
    return f"{folder}: {count} not .png and not read: {named}"


def read_png(path: PathLike, channels: int) -> np.ndarray:
    """One PNG file as uint8 ``[H, W, channels]`` (channels 1 or 3)."""
    from PIL import Image, UnidentifiedImageError  # pillow: a dependency, imported where it is used

    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise fail(path, f"is a {mode} (16-bit or float) image; 8-bit grey or RGB PNGs are expected")
            rgba = np.asarray(image.convert("RGBA"))
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise fail(path, f"not a readable PNG file ({type(e).__name__}: {e})") from None
    if (rgba[..., 3] != 255).any():
        raise fail(path, "has transparent pixels; save it without an alpha channel")
    rgb = rgba[..., :3]
    if channels == 3:
        return rgb
    if (rgb != rgb[..., :1]).any():
        raise fail(path, "is a colour image; the model takes grey images (1 channel)")
    return rgb[..., :1]


def read_png_folder(path: PathLike, *, channels: int, vocab_size: int = 256) -> tuple[ArraySource, list[str]]:
    """(the images of every PNG file in the folder ``path``, their file names), validated as any split is
    (``make_split``: values below ``vocab_size``). ``channels``: 1 (grey) or 3 (RGB)."""
    if channels not in (1, 3):
        raise fail(path, f"PNG files hold grey or RGB images, and the model takes {channels} channels")
    names = png_files(path)
    images = [read_png(os.path.join(os.fspath(path), n), channels) for n in names]
    odd = next((i for i, im in enumerate(images) if im.shape[:2] != images[0].shape[:2]), None)
    if odd is not None:
        (h, w), (h0, w0) = images[odd].shape[:2], images[0].shape[:2]
        raise fail(os.path.join(os.fspath(path), names[odd]), f"is {h}x{w} while {names[0]} is {h0}x{w0}; the "
                   "folder's images must all have one size")
    return make_split(np.stack(images), vocab_size=vocab_size, origin=os.fspath(path)), names
