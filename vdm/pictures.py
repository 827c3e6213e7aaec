"""Pictures of samples: a grid of images (or a scatter plot of 2-D points) as a PNG, and a run's sample files."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vdm import paths


def draw_samples(images: np.ndarray, vocab_size: int, kind: str, columns: int | None = None) -> np.ndarray:
    """A uint8 picture of integer samples [N, H, W, C] in {0..V-1}, as the data set's ``kind`` asks.

    ``"image"``: a grid with a 2-pixel border, values scaled to 0..255, ``columns`` wide
    (default: about square); images whose channels are not grey or RGB show each channel as a grey
    image, side by side. ``"points"`` (2-D data, [N, 1, 1, 2]): a V x V scatter plot.
    """
    n, h, w, c = images.shape
    if kind != "points" and c not in (1, 3):
        images = np.concatenate(np.split(images, c, axis=-1), axis=2)  # [N, H, W C, 1]
        n, h, w, c = images.shape
    if kind == "points":
        canvas = np.full((vocab_size, vocab_size), 255, np.uint8)
        xy = images.reshape(n, 2).astype(np.int64)
        canvas[vocab_size - 1 - xy[:, 1], xy[:, 0]] = 0
        return canvas
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2, c), np.uint8)
    scaled = np.round(images.astype(np.float64) * 255.0 / (vocab_size - 1)).astype(np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + k * (w + 2): 2 + k * (w + 2) + w] = scaled[i]
    return grid[..., 0] if c == 1 else grid


def save_png(path: str, picture: np.ndarray) -> None:
    """Write a uint8 picture as a PNG file (a local path or a URL)."""
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    paths.write_bytes(path, buffer.getvalue())


def unused_name(base: str, extensions: tuple[str, ...] = (".npz", ".png")) -> str:
    """``base`` (``DIR/samples_<step>``) if no file of that name with one of ``extensions`` exists, else the first
    free ``base_2``, ``base_3``, ...: samples drawn again at a step (``--mode sample``), or images scored again
    (``vdm.image_bpd``), never replace earlier ones."""
    name, k = base, 1
    while any(paths.path(name + extension).exists() for extension in extensions):
        k += 1
        name = f"{base}_{k}"
    return name


def save_samples(path: str, images: np.ndarray, nfe: int, labels, vocab_size: int, kind: str,
                 columns: int | None = None) -> np.ndarray:
    """``path.npz`` (``images`` uint8 [N, H, W, C], ``nfe`` and, for a conditional model, ``labels``) and
    ``path.png`` (``draw_samples``); returns the picture."""
    arrays = {"images": images, "nfe": np.int64(nfe)} | ({} if labels is None else {"labels": np.asarray(labels)})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    paths.write_bytes(path + ".npz", buffer.getvalue())
    picture = draw_samples(images, vocab_size, kind, columns=columns)
    save_png(path + ".png", picture)
    return picture
