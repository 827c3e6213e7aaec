"""Uniform against truncated-normal dequantisation of the probability-flow ODE's bound, on one trained model.

    python -m vdm.main --config configs/mnist_idode.py --workdir workdirs/mnist_idode      # train
    python experiments/likelihood/dequantization.py --config configs/mnist_idode.py --workdir workdirs/mnist_idode
    python experiments/likelihood/dequantization.py --tiny --out /tmp/likelihood   # every stage in seconds

Evaluates the newest checkpoint on the first ``--num_eval`` test digits three ways, each image with its own
value: the VLB, and the ODE's bound with q uniform on the bin and with q the normal of scale
sigma_0 / alpha_0 = exp(gamma_0 / 2) truncated to the bin (``vdm/likelihood.py``, i-DODE's choice). The two ODE
bounds are compared per image (the paired difference and its standard error). Writes ``dequantization.json``
and the table of ``README.md`` beside this file (between the ``<!-- dequantization -->`` markers), or in ``--out``.
``--tiny``: the config with ``common.TINY`` and ``common.DEMO`` (with configs/mnist.py: the tiny demo model the other
studies of a trained model restore), trained ``common.TINY_STEPS`` steps in ``--workdir`` (default ``<out>/model``)
unless it is there (the ODE's tolerances loosened to 1e-2), on 2 digits: checks the script.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

BOUNDS = [("VLB", "vlb", "uniform"), ("ODE, uniform", "ode", "uniform"),
          ("ODE, truncated normal", "ode", "truncated_normal")]


def _measure(config_path: str, workdir: str, num_eval: int, overrides: dict | None = None) -> dict:
    import numpy as np

    from common import evaluate_checkpoint

    rows, per_image = [], {}
    for label, method, dequantization in BOUNDS:
        result = evaluate_checkpoint(config_path, (overrides or {}) | {
            "eval.method": method, "eval.num_examples": num_eval, "eval.ode.dequantization": dequantization}, workdir)
        per_image[label] = np.asarray(result["per_image"], np.float64)
        rows.append({"bound": label, "bpd": round(result["bpd"], 4), "se": round(result["bpd_se"], 4),
                     "seconds": result["seconds"], "images": len(result["per_image"])})
        print(rows[-1], flush=True)
    diff = per_image["ODE, truncated normal"] - per_image["ODE, uniform"]
    return {"config": config_path, "step": result["step"], "bounds": rows,
            "truncated_minus_uniform": round(float(diff.mean()), 4),
            "truncated_minus_uniform_se": round(float(diff.std(ddof=1) / np.sqrt(len(diff))), 4)}


def _tables(record: dict) -> str:
    lines = [f"`{record['config']}` at step {record['step']}, {record['bounds'][0]['images']} test digits "
             f"(commit {record['commit']}).", "", "| bound | bits/dim | standard error | seconds |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['bound']} | {r['bpd']} | {r['se']} | {r['seconds']} |" for r in record["bounds"]]
    lines += ["", f"Truncated normal minus uniform, per image: {record['truncated_minus_uniform']:+.4f} "
              f"+- {record['truncated_minus_uniform_se']:.4f} bits/dim."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist_idode.py")
    parser.add_argument("--workdir", default=None, help="the trained model (default workdirs/mnist_idode; with "
                                                        "--tiny: <out>/model, trained there if missing)")
    parser.add_argument("--num_eval", type=int, default=None, help="default 50; with --tiny 2")
    common.add_output_flags(parser)
    args = parser.parse_args(argv)
    out = common.output_dir(args, HERE)
    args.workdir = args.workdir or (os.path.join(out, "model") if args.tiny else "workdirs/mnist_idode")
    args.num_eval = args.num_eval or (2 if args.tiny else 50)

    from common import commit, write_results

    overrides = common.tiny_model(args.config, args.workdir, common.DEMO) if args.tiny else {}
    record = _measure(args.config, args.workdir, args.num_eval, overrides) | {"commit": commit()}
    write_results(out, record, _tables(record), name="dequantization")
    print(_tables(record))
    return record


if __name__ == "__main__":
    main()
