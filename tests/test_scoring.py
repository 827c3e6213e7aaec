"""--mode score (vdm.image_bpd): bits/dim per image, checked against the test split's evaluation, against
noise, and on bad image files; the PNG folder reader against the arrays it was written from."""
from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
from conftest import parse_command_line
from PIL import Image

from vdm import compilation, data, image_bpd, main, train
from vdm.data.png import read_png_folder


def _test_digits():
    test = data.load_dataset("sklearn_digits").test
    rows = data.read_rows(test, np.arange(len(test)))
    return rows["image"], rows["label"]


@pytest.mark.slow
@pytest.mark.xdist_group("digits_cond")
def test_held_out_digits_score_fewer_bits_than_noise_and_average_to_the_evaluation(digits_cond, tmp_path):
    """The conditional model trained briefly on the 8x8 digits (conftest.digits_cond): every held-out digit
    and a uniform-noise image of the same shape, interleaved in one file, scored per image. Nearly every
    digit scores fewer bits/dim than nearly every noise image (AUROC); the digits' scores averaged over the
    test split equal --mode eval's bits/dim over it within the two estimates' standard errors; the CSV holds
    the returned figures, row by row in file order."""
    config, workdir, _ = digits_cond
    digits, labels = _test_digits()
    n = len(digits)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 17, size=digits.shape, dtype=np.uint8)
    images = np.stack([digits, noise], axis=1).reshape(2 * n, *digits.shape[1:])  # digit, noise, digit, ...
    path = tmp_path / "mixed.npz"
    np.savez(path, images=images, labels=np.stack([labels, rng.integers(0, 10, n)], axis=1).reshape(-1))

    settings = {"eval.num_examples": 0, "eval.score_draws": 8}  # one config: its functions compiled once
    result = image_bpd.per_image_bpd(config, workdir, str(path), settings)
    evaluated = train.evaluate_checkpoint(config, workdir, settings)

    bpd, se = result["bpd"], result["bpd_se"]
    digit_bpd, noise_bpd = bpd[0::2], bpd[1::2]
    area = image_bpd.auroc(digit_bpd, noise_bpd)
    print(f"\n[scoring, 300 steps] digits {digit_bpd.mean():.2f}, noise {noise_bpd.mean():.2f} bits/dim; AUROC "
          f"{area:.4f}; median per-image standard error {np.median(se):.3f}")
    assert area > 0.98
    assert result["count"] == 2 * n and evaluated["count"] == n and np.all(se > 0)
    # Two estimates of one mean over the same images: the evaluation's single draw per image (its standard
    # error over the images bounds its Monte Carlo error) and the mean of the per-image scores.
    tolerance = 4 * math.hypot(evaluated["bpd_se"], math.sqrt(np.sum(se[0::2] ** 2)) / n)
    assert abs(digit_bpd.mean() - evaluated["bpd"]) < tolerance, (digit_bpd.mean(), evaluated["bpd"], tolerance)

    assert os.path.basename(result["scores"]) == f"scores_{result['step']}.csv"
    with open(result["scores"]) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "label", "bpd", "bpd_se"]
    assert [r["image"] for r in rows] == [str(i) for i in range(2 * n)]
    assert [int(r["label"]) for r in rows] == list(np.load(path)["labels"])
    np.testing.assert_allclose([float(r["bpd"]) for r in rows], bpd, atol=1e-6)
    np.testing.assert_allclose([float(r["bpd_se"]) for r in rows], se, atol=1e-6)
    again = image_bpd.per_image_bpd(config, workdir, {"images": images[:4], "labels": np.zeros(4, int)}, settings)
    assert os.path.basename(again["scores"]) == f"scores_{result['step']}_2.csv"  # the first is kept
    assert os.path.exists(result["scores"])


def _write(path, images, **extra):
    np.savez(path, images=images, **extra)
    return str(path)


@pytest.mark.xdist_group("digits_cond")
def test_bad_images_are_one_line_before_anything_is_compiled(digits_cond, tmp_path, monkeypatch):
    config, workdir, _ = digits_cond
    digits, labels = _test_digits()

    def compiled(*args, **kwargs):
        raise AssertionError("compiled before the images were checked")
    monkeypatch.setattr(compilation, "compile_run", compiled)
    png_folder = tmp_path / "pngs"
    png_folder.mkdir()
    Image.fromarray(digits[0, ..., 0]).save(png_folder / "a.png")
    (tmp_path / "text.npz").write_text("not an archive")
    before = sorted(os.listdir(workdir))
    cases = [
        (_write(tmp_path / "big.npz", np.zeros((2, 28, 28, 1), np.uint8), labels=[0, 1]),
         "images are 28x28x1 (H x W x C); the model takes 8x8x1 (sklearn_digits)"),
        (_write(tmp_path / "range.npz", np.full((2, 8, 8, 1), 200, np.uint8), labels=[0, 1]),
         "pixel value 200 is out of range for vocab_size 17"),
        (_write(tmp_path / "float.npz", digits[:2].astype(np.float32), labels=labels[:2]),
         "images have dtype float32, expected uint8"),
        (_write(tmp_path / "unlabelled.npz", digits[:2]), "the model is class-conditional (10 classes)"),
        (_write(tmp_path / "label.npz", digits[:2], labels=[0, 12]), "label 12 is out of range"),
        (str(png_folder), "the model is class-conditional"),
        (str(tmp_path / "text.npz"), "not an .npz file"),
        (str(tmp_path / "missing"), "no such file or folder"),
    ]
    for images, message in cases:
        with pytest.raises(data.DataError) as info:
            image_bpd.per_image_bpd(config, workdir, images)
        assert message in str(info.value) and "\n" not in str(info.value), (images, str(info.value))
    assert sorted(os.listdir(workdir)) == before  # nothing written


def test_a_folder_of_png_files_reads_back_the_images_it_was_written_from(tmp_path):
    """Grey PNGs, and a grey image saved as RGB, read back as the uint8 arrays they were written from, in
    name order; what would change a pixel (colour, transparency, 16 bits, mixed sizes) is one line."""
    digits, _ = _test_digits()
    folder = tmp_path / "digits"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(digits[i, ..., 0]).save(folder / f"d{i}.png")
    Image.fromarray(np.repeat(digits[3], 3, axis=-1)).save(folder / "d3.png")  # grey, stored as RGB
    source, names = read_png_folder(folder, channels=1, vocab_size=17)
    assert names == ["d0.png", "d1.png", "d2.png", "d3.png"]
    np.testing.assert_array_equal(source.images, digits[:4])
    rgb, _ = read_png_folder(folder, channels=3, vocab_size=17)
    np.testing.assert_array_equal(rgb.images, np.repeat(digits[:4], 3, axis=-1))

    info = data.DatasetInfo("sklearn_digits", (8, 8, 1), 17, 1621, 176, 0, "image")
    read, read_names = image_bpd.read_images(str(folder), info, num_classes=0)
    np.testing.assert_array_equal(read.images, digits[:4])
    assert read_names == names

    def one_line(folder, message, channels=1):
        with pytest.raises(data.DataError) as e:
            read_png_folder(folder, channels=channels, vocab_size=256)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)

    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 255
    cases = {"colour": (Image.fromarray(colour), "is a colour image"),
             "alpha": (Image.fromarray(np.zeros((8, 8, 4), np.uint8)), "has transparent pixels"),
             "deep": (Image.fromarray(np.zeros((8, 8), np.uint16)), "16-bit or float"),
             "sizes": (Image.fromarray(np.zeros((9, 8), np.uint8)), "is 9x8 while a.png is 8x8")}
    for name, (image, message) in cases.items():
        bad = tmp_path / name
        bad.mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(bad / "a.png")
        image.save(bad / "b.png")
        one_line(bad, message)
    (tmp_path / "empty").mkdir()
    one_line(tmp_path / "empty", "holds no .png files")
    (tmp_path / "big").mkdir()
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "big" / "a.png")
    with pytest.raises(data.DataError, match=r"images are 9x8x1 \(H x W x C\); the model takes 8x8x1"):
        image_bpd.read_images(str(tmp_path / "big"), info, num_classes=0)


def test_the_command_line_asks_for_images_in_score_mode_only():
    for argv, message in ((["--mode", "score"], "--mode score needs --images"),
                          (["--images", "x.npz"], "--images is for --mode score, not --mode train")):
        with pytest.raises(main.CommandLineError, match=message):
            parse_command_line(["--config", "digits", "--workdir", "/tmp/unused", *argv])


def test_auroc_is_the_probability_that_an_outside_image_scores_more():
    assert image_bpd.auroc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert image_bpd.auroc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert image_bpd.auroc([1.0, 3.0], [2.0, 3.0]) == (1 + 0 + 1 + 0.5) / 4  # pairs (out > in), ties half


def test_vdm_scoring_is_a_deprecated_alias_of_image_bpd(monkeypatch):
    """0.2's ``vdm.scoring`` still imports, for one release: the same functions (``score_images`` is
    ``per_image_bpd``), and importing it warns once, naming ``vdm.image_bpd``."""
    import importlib
    import sys
    import warnings

    monkeypatch.delitem(sys.modules, "vdm.scoring", raising=False)  # a fresh import, put back afterwards
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scoring = importlib.import_module("vdm.scoring")
        importlib.import_module("vdm.scoring")  # imported once: no second warning
    assert [(w.category, str(w.message)) for w in caught] == [
        (DeprecationWarning, "vdm.scoring is deprecated: use vdm.image_bpd (bits/dim per image; score_images is now "
                             "vdm.image_bpd.per_image_bpd)")]
    assert scoring.score_images is image_bpd.per_image_bpd
    for name in ("PASSES", "auroc", "check_finite", "per_image_bounds", "read_images", "summary", "write_csv"):
        assert getattr(scoring, name) is getattr(image_bpd, name), name
