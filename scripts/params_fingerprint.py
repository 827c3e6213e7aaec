"""Train a config for a few steps, single-threaded, and save its parameters: the before/after check of a refactor.

    python scripts/params_fingerprint.py --config mnist --steps 200 --out /tmp/before.npz   # at the old commit
    python scripts/params_fingerprint.py --config mnist --steps 200 --out /tmp/after.npz    # at the new one
    python scripts/params_fingerprint.py --compare /tmp/before.npz /tmp/after.npz

A refactor that keeps the arithmetic keeps the parameters bitwise; ``--compare`` prints, for each
parameter (and each figure of the final evaluation, ``result/...``) that differs, its largest
absolute difference. XLA:CPU's multi-threaded kernels round
differently from run to run, so the run is forced onto one thread (``XLA_FLAGS``, set here before JAX
starts); ``train.grad_clip=0`` by default (the global norm's reduction order is the most fragile sum).
Only the public entry point (``vdm.train.train_and_evaluate``) and the checkpoint files are used, so
the script runs unchanged at both commits. Any ``--set field=value`` is passed on as an override.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
                           " intra_op_parallelism_threads=1").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out |= _flat(v, f"{prefix}/{k}" if prefix else str(k))
        return out
    return {prefix: np.asarray(tree)}


def train(config: str, steps: int, out: str, settings: list[str]) -> None:
    import orbax.checkpoint as ocp

    from vdm import train as train_lib

    overrides = {"train.num_steps": steps, "train.grad_clip": 0.0, "train.checkpoint_every": steps,
                 "train.eval_every": steps, "train.compilation_cache_dir": "", "eval.num_examples": 8,
                 "sample.num_images": 2, "sample.steps": 1, "sample.fd_mnist": False}
    for item in settings:
        key, _, value = item.partition("=")
        overrides[key] = _value(value)
    with tempfile.TemporaryDirectory() as workdir:
        result = train_lib.train_and_evaluate(config, workdir, overrides=overrides)
        restored = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", str(steps), "default"))
    params = _flat(restored["params"])
    figures = {f"result/{k}": np.float64(v) for k, v in result.items() if isinstance(v, float)}
    np.savez(out, **params, **figures)
    print(f"{len(params)} parameters and {len(figures)} figures of {config} after {steps} steps -> {out}")


def _value(text: str):
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def compare(a: str, b: str) -> int:
    with np.load(a) as x, np.load(b) as y:
        names = sorted(set(x.files) | set(y.files))
        differ = 0
        for name in names:
            if name not in x.files or name not in y.files:
                print(f"{name}: only in {a if name in x.files else b}")
                differ += 1
            elif x[name].shape != y[name].shape or x[name].tobytes() != y[name].tobytes():
                gap = np.max(np.abs(x[name].astype(np.float64) - y[name].astype(np.float64))) \
                    if x[name].shape == y[name].shape else float("nan")
                print(f"{name}: differs (max |diff| {gap:.3g})")
                differ += 1
        print(f"{len(names) - differ} of {len(names)} parameters and figures bitwise equal")
        return 1 if differ else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mnist")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = parser.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    train(args.config, args.steps, args.out, args.set)
