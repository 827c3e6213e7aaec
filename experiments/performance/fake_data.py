"""Random uint8 images in the ``npz`` source's layout, to time configs whose data is not here.

    python experiments/performance/fake_data.py /tmp/fake_cifar --shape 32 32 3
    python -m vdm.bench --config cifar10 --config.data.source=npz --config.data.kwargs.path=/tmp/fake_cifar

Timing does not depend on pixel values, so the paper's CIFAR-10 configuration can be benchmarked
without the CIFAR-10 archive (which cannot be downloaded here).
"""
from __future__ import annotations

import argparse
import os

import numpy as np


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 3], metavar=("H", "W", "C"))
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--test", type=int, default=512)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    os.makedirs(args.directory, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", args.train), ("test", args.test)):
        np.savez(os.path.join(args.directory, f"{split}.npz"),
                 images=rng.integers(0, 256, (n, *args.shape), dtype=np.uint8),
                 labels=rng.integers(0, 10, n, dtype=np.int64))
    print(f"wrote {args.train} + {args.test} random {tuple(args.shape)} images to {args.directory}")


if __name__ == "__main__":
    main()
