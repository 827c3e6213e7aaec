"""Samplers and likelihoods on a trained MNIST model: FD-MNIST and wall time against network
evaluations for each sampler, and the VLB against the probability-flow ODE's bits/dim.

    python -m vdm.main --config configs/mnist.py --workdir workdirs/mnist        # train (make demo)
    python experiments/samplers/run.py --config configs/mnist.py --workdir workdirs/mnist
    python experiments/samplers/run.py --tiny --out /tmp/samplers   # every stage in seconds (common.TINY)

Writes ``results.json``, ``samplers.png`` (FD-MNIST against network evaluations) and the tables
of ``README.md`` beside this file (between the ``<!-- results -->`` markers); ``--tables_only``
rebuilds the plot and tables from ``results.json`` without measuring. Every sampler draws ``--num_images``
samples from the same
seed with the EMA parameters; FD-MNIST is against the 500 test digits (``vdm.quality``).
The fixed-step samplers run at each ``--nfe``; the adaptive ODE sampler at each tolerance
in ``--ode_tolerances``, with the evaluations it took. The likelihoods are over
``--num_eval`` test digits, with standard errors over the images. ``--out``: write there instead.
``--tiny``: the tiny demo model (the config with ``common.TINY`` and ``common.DEMO``), trained ``common.TINY_STEPS``
steps in ``--workdir`` (default ``<out>/model``) unless it is there; the samplers of ``TINY_SAMPLERS`` (a fixed-step
one, at 2 steps), few images and digits: checks the script, measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

# --tiny's budget, in place of the defaults of these flags
TINY_ARGS = {"num_images": 8, "num_eval": 2, "nfe": [2], "ode_tolerances": []}
TINY_SAMPLERS = ("ancestral",)  # --tiny: one fixed-step sampler (each sampler and setting: one more compilation)


def _sample_rows(trainer, args):
    import jax
    import numpy as np
    from flax import nnx

    from vdm import model as model_lib
    from vdm import quality

    reference = trainer.dataset.test.images
    net = quality.MnistFeatures.load_or_train(os.path.join(args.workdir, "fd_mnist_classifier.npz"))
    cases = [("ancestral", {}, n) for n in args.nfe]
    cases += [("ddim", {"eta": 0.0}, n) for n in args.nfe if n <= 256]
    cases += [("dpm_solver_2m", {}, n) for n in args.nfe if n <= 256]
    cases += [("ode", {"rtol": tol, "atol": tol}, 0) for tol in args.ode_tolerances]
    if args.tiny:
        cases = [case for case in cases if case[0] in TINY_SAMPLERS]
    rows = []
    for name, kwargs, steps in cases:
        fn = jax.jit(lambda p, r, name=name, kwargs=kwargs, steps=steps: model_lib.generate(
            nnx.merge(trainer.graphdef, p), r, args.num_images, num_steps=steps, sampler=name,
            sampler_kwargs=kwargs))
        key = jax.random.PRNGKey(args.seed)
        jax.block_until_ready(fn(trainer.state.ema_params, key))  # compile
        start = time.perf_counter()
        images, nfe = jax.block_until_ready(fn(trainer.state.ema_params, key))
        seconds = time.perf_counter() - start
        images = np.asarray(images).astype(np.uint8)
        row = {"sampler": name, "options": kwargs, "nfe": int(nfe), "seconds": round(seconds, 2),
               "fd_mnist": round(net.fd(images, reference), 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, net.test_accuracy


def _likelihood_rows(config, args):
    from vdm import train

    rows = []
    for label, method, dequantization in [("VLB", "vlb", "uniform"), ("ODE, uniform", "ode", "uniform"),
                                          ("ODE, truncated normal", "ode", "truncated_normal")]:
        config.eval.method = method
        config.eval.ode.dequantization = dequantization
        config.eval.num_examples = args.num_eval
        trainer = train.Trainer(config, args.workdir)
        trainer.restore_latest()
        start = time.perf_counter()
        result = trainer.evaluate()
        key = "bpd" if method == "vlb" else "bpd_ode"
        row = {"bound": label, "bpd": round(result[key], 4), "se": round(result[f"{key}_se"], 4),
               "nfe_per_batch": result.get("ode_nfe"), "seconds": round(time.perf_counter() - start, 1),
               "images": int(result["count"])}
        trainer.close()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _plot(samples, num_images: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, name in enumerate(dict.fromkeys(r["sampler"] for r in samples)):
        rows = sorted((r for r in samples if r["sampler"] == name), key=lambda r: r["nfe"])
        label = name + (" (adaptive: rtol = atol = " + ", ".join(f"{r['options']['rtol']:g}" for r in rows) + ")"
                        if name == "ode" else "")
        ax.plot([r["nfe"] for r in rows], [r["fd_mnist"] for r in rows], "o-", color=f"C{i}", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations")
    ax.set_ylabel(f"FD-MNIST of {num_images} samples (lower is better)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("stochastic against deterministic samplers, one trained model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tables(record: dict) -> str:
    samples, likelihoods = record["samples"], record["likelihoods"]
    lines = [f"FD-MNIST of {record['num_images']} samples against the 500 test digits (feature classifier "
             f"{record['classifier_accuracy']:.1%} on them); wall time of one sampling call. Commit "
             f"{record['commit']}, {record['seconds'] / 60:.0f} min on {record['device']}.", "",
             "![FD-MNIST against network evaluations](samplers.png)", "",
             "| sampler | options | network evaluations | FD-MNIST | seconds |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['sampler']} | {json.dumps(r['options']) if r['options'] else ''} | {r['nfe']} | {r['fd_mnist']} | "
              f"{r['seconds']} |" for r in samples]
    lines += ["", f"Bits/dim on {likelihoods[0]['images']} test digits, with standard errors over the images.", "",
              "| bound | bits/dim | standard error | network evaluations per batch | seconds |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['bound']} | {r['bpd']} | {r['se']} | {r['nfe_per_batch'] or ''} | {r['seconds']} |"
              for r in likelihoods]
    return "\n".join(lines)


def _publish(record: dict, out: str) -> None:
    """``samplers.png``, ``results.json`` and the README's tables in ``out`` from a finished ``record``."""
    from common import write_results

    _plot(record["samples"], record["num_images"], os.path.join(out, "samplers.png"))
    write_results(out, record, _tables(record))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist.py")
    parser.add_argument("--workdir", default=None, help="the trained model (default workdirs/mnist; with --tiny: "
                                                        "<out>/model, trained there if missing)")
    parser.add_argument("--num_images", type=int, default=None, help="default 500")
    parser.add_argument("--num_eval", type=int, default=None, help="default 100")
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help="default 10 20 50 100 256 1000")
    parser.add_argument("--ode_tolerances", type=float, nargs="+", default=None, help="default 1e-2 1e-3 1e-4")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip_samplers", action="store_true",
                        help="reuse the sampler rows of results.json and measure only the likelihoods")
    parser.add_argument("--tables_only", action="store_true",
                        help="rebuild samplers.png and the README's tables from results.json, measuring nothing")
    common.add_output_flags(parser)
    args = parser.parse_args(argv)
    out = common.output_dir(args, HERE)
    defaults = TINY_ARGS | {"workdir": os.path.join(out, "model")} if args.tiny else {
        "workdir": "workdirs/mnist", "num_images": 500, "num_eval": 100, "nfe": [10, 20, 50, 100, 256, 1000],
        "ode_tolerances": [1e-2, 1e-3, 1e-4]}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    from common import commit

    results = os.path.join(out, "results.json")
    if args.tables_only:
        with open(results) as f:
            record = json.load(f)
        _publish(record, out)
        return record

    import jax

    from vdm import train

    began = time.perf_counter()
    overrides = common.tiny_model(args.config, args.workdir, common.DEMO) if args.tiny else {}
    config = train.resolve_config(args.config, overrides)
    trainer = train.Trainer(config, args.workdir, must_exist=True)
    step = trainer.restore_latest()
    if step == 0:
        sys.exit(f"error: no checkpoint in {args.workdir}: train {args.config} first")
    if args.skip_samplers:
        with open(results) as f:
            saved = json.load(f)
        samples, accuracy = saved["samples"], saved["classifier_accuracy"]
        args.num_images = saved["num_images"]
    else:
        samples, accuracy = _sample_rows(trainer, args)
    trainer.close()
    record = {"step": step, "config": args.config, "num_images": args.num_images, "classifier_accuracy": accuracy,
              "samples": samples}
    with open(results, "w") as f:  # the sampler rows are kept even if the likelihoods fail
        json.dump(record, f, indent=1)
    record["likelihoods"] = _likelihood_rows(config, args)
    record |= {"commit": commit(), "seconds": round(time.perf_counter() - began, 1),
               "device": jax.devices()[0].device_kind}
    _publish(record, out)
    return record


if __name__ == "__main__":
    main()
