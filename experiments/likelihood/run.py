"""The likelihood frontier on the embedded MNIST digits: VDM's baseline beside v-prediction, i-DODE's importance
sampling, MuLAN, DiffEnc and a combination, at equal steps and the same denoising network.

    python experiments/likelihood/run.py                          # every variant in VARIANTS, then the tables
    python experiments/likelihood/run.py --only vdm mulan         # some of them (the tables keep the others')
    python experiments/likelihood/run.py --tiny --out /tmp/likelihood   # every stage in seconds (common.TINY)

Each variant is a shipped config with overrides (``VARIANTS``), all on the ELBO with configs/mnist.py's network,
trained for ``--steps`` steps (the learning rate warmed up, then decayed to 0 by a cosine) in
``<workroot>/<variant>`` by ``vdm.train.train_and_evaluate``, with the VLB on the 500 test digits every
``--eval_every`` steps (the curve). Its newest checkpoint is then evaluated image by image: the VLB on the 500
test digits, and the probability-flow ODE's bound (rtol = atol = 1e-4) with the truncated-normal and, for the
baseline and i-DODE's variant, the uniform dequantisation on the first ``--num_ode`` of them (``Variant.bounds``:
one ODE bound of 16 digits takes about 5 minutes on 2 cores). Every variant sees the same images with the same
evaluation randomness, so each bound is compared with the baseline's per image (the paired difference and its
standard error). The two fine-tuning variants continue the i-DODE variant's finished run for
``--finetune_steps`` steps, with i-DODE's second-order term and without it, and are compared with each other.
A variant already trained or evaluated is read back from its workdir: an interrupted study resumes.

Writes ``results.json`` (one record per variant: ``config``, ``overrides``, ``bpd``, ``bpd_se`` and the rest),
``study.png`` (test bits/dim against steps) and the table of ``README.md`` beside this file (or in ``--out``).
``--tiny``: the variants of ``TINY_VARIANTS`` (the baseline: on ``common.TINY_MNIST``'s network its config is the tiny
demo model's, ``common.DEMO``, whose compiled functions, the ODE's bounds among them, the other tiny studies share;
each other variant would be a model to compile anew), 2 steps with an evaluation after each (a continuation named
with ``--only`` no more: ``--finetune_steps 0``, copied, evaluated, not trained), the VLB on ``common.TINY``'s few
digits and the ODE's bounds (at its loose tolerances) on 2, in ``<out>/runs``: checks the script, measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import NamedTuple

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

BASELINE = "vdm"
ELBO = {"loss.weighting": "elbo"}  # configs/mnist.py trains sigmoid(8 - lambda) for its samples
FINETUNE = {"train.lr": 2e-4, "train.lr_schedule": "constant"}  # configs/mnist_idode_finetune.py's stage 2


class Variant(NamedTuple):
    what: str
    config: str
    overrides: dict
    parent: str = ""  # a variant whose trained workdir this one continues for --finetune_steps more steps
    bounds: tuple = ("vlb", "ode_uniform", "ode_truncated")  # what is measured (an ODE bound: ~4 min on 2 cores)


TRUNCATED = ("vlb", "ode_truncated")  # the ODE's dequantisation for models trained on the ELBO (i-DODE's)


VARIANTS = {
    "vdm": Variant("VDM: learned scalar schedule, eps", "configs/mnist.py", ELBO),
    "v_prediction": Variant("v-prediction", "configs/mnist.py", ELBO | {"model.prediction": "v"}, bounds=("vlb",)),
    "importance_sampled": Variant("i-DODE: v, importance-sampled lambda, fixed linear", "configs/mnist_idode.py", {}),
    "mulan": Variant("MuLAN: per-pixel gamma(c, t), latent c", "configs/mnist_mulan.py", {}, bounds=TRUNCATED),
    "diffenc": Variant("DiffEnc: learned mean encoder", "configs/mnist_diffenc.py", {}, bounds=TRUNCATED),
    "diffenc_v_is": Variant("DiffEnc + i-DODE's v and importance sampling", "configs/mnist_diffenc.py",
                            {"model.prediction": "v", "model.schedule": "fixed_linear",
                             "loss.importance_sampling": "weighting"}, bounds=("vlb",)),
    # i-DODE's second stage against the same extra steps without its term, both from importance_sampled's run
    "idode_finetuned": Variant("i-DODE + fine-tuning (second-order term)", "configs/mnist_idode_finetune.py",
                               FINETUNE, parent="importance_sampled", bounds=TRUNCATED),
    "idode_control": Variant("i-DODE + the same steps without the term", "configs/mnist_idode.py", FINETUNE,
                             parent="importance_sampled", bounds=TRUNCATED),
}
# The ODE's tolerances in the study: 1e-5 (the configs') takes about 6 minutes per bound of 16 digits on 2 cores.
ODE = {"eval.ode.rtol": 1e-4, "eval.ode.atol": 1e-4}
TINY_VARIANTS = (BASELINE,)
BOUNDS = (("vlb", "vlb", "uniform"), ("ode_uniform", "ode", "uniform"), ("ode_truncated", "ode", "truncated_normal"))


def _study_overrides(args) -> dict:
    # --tiny: the baseline is the tiny demo model's config (common.DEMO), FD-MNIST included: its compiled functions
    return (common.TINY_MNIST if args.tiny else {}) | {
        "train.num_steps": args.steps, "train.lr_schedule": "cosine", "train.eval_every": args.eval_every,
        "train.checkpoint_every": args.eval_every, "eval.method": "vlb",
        "eval.num_examples": common.TINY["eval.num_examples"] if args.tiny else 0,
        "sample.num_images": common.TINY["sample.num_images"] if args.tiny else 16, "sample.fd_mnist": args.tiny}


def _curve(workdir: str) -> list[tuple[int, float, float]]:
    """(step, test bits/dim, its standard error) of every evaluation of the run, from its metrics.jsonl."""
    points = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "eval_bpd" in row:
                points[row["step"]] = (row["step"], row["eval_bpd"], row["eval_bpd_se"])
    return sorted(points.values())


def _evaluated(config: str, overrides: dict, workdir: str, bound: tuple, num_examples: int, ode: dict) -> dict:
    """``common.evaluate_checkpoint`` of one bound (the ODE's with the tolerances ``ode``), kept in
    ``workdir/bound_<name>.json`` (read back if there)."""
    name, method, dequantization = bound
    path = os.path.join(workdir, f"bound_{name}.json")
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
        if record["num_examples"] == num_examples:
            return record
    record = common.evaluate_checkpoint(config, overrides | ode | {"eval.method": method,
                                                                    "eval.num_examples": num_examples,
                                                                    "eval.ode.dequantization": dequantization}, workdir)
    record["num_examples"] = num_examples
    with open(path, "w") as f:
        json.dump(record, f)
    return record


def _run(name: str, args) -> dict:
    v = VARIANTS[name]
    overrides = _study_overrides(args) | v.overrides
    workdir = os.path.join(args.workroot, name)
    if v.parent:  # a continuation: a copy of the parent's finished run, trained on for --finetune_steps
        overrides["train.num_steps"] = args.steps + args.finetune_steps
        if not os.path.exists(workdir):
            parent = os.path.join(args.workroot, v.parent)
            if not os.path.exists(os.path.join(parent, "study_run.json")):
                sys.exit(f"error: {name} continues {v.parent}: run that variant first (--only {v.parent})")
            shutil.copytree(parent, workdir, ignore=shutil.ignore_patterns("study_run.json", "bound_*.json", "lock"))
    trained = common.trained(v.config, workdir, overrides)
    ode = {k: common.TINY[k] for k in ODE} if args.tiny else ODE  # --tiny: what the runs were trained with already
    bounds = {b[0]: _evaluated(v.config, overrides, workdir, b,
                               overrides["eval.num_examples"] if b[1] == "vlb" else args.num_ode, ode)
              for b in BOUNDS if b[0] in v.bounds}
    record = {"variant": name, "what": v.what, "config": v.config, "overrides": overrides, "ode": ode, "parent": v.parent,
              "step": trained["step"], "train_seconds": trained["train_seconds"], "curve": _curve(workdir)}
    for key, b in bounds.items():
        record[key] = {"bpd": b["bpd"], "bpd_se": b["bpd_se"], "seconds": b["seconds"], "images": len(b["per_image"]),
                       "per_image": b["per_image"]}
    record["bpd"], record["bpd_se"] = record["vlb"]["bpd"], record["vlb"]["bpd_se"]
    if "bpd_latent" in bounds["vlb"]:
        record["bpd_latent"] = bounds["vlb"]["bpd_latent"]
    return record


def _paired(record: dict, baseline: dict) -> None:
    """Per bound: this variant minus the baseline, image by image, and the standard error of that mean."""
    import numpy as np

    for key, _, _ in BOUNDS:
        if key not in record or key not in baseline:
            continue
        a, b = np.asarray(record[key]["per_image"]), np.asarray(baseline[key]["per_image"])
        d = a - b
        record[key]["minus_baseline"] = round(float(d.mean()), 4)
        record[key]["minus_baseline_se"] = round(float(d.std(ddof=1) / np.sqrt(len(d))), 4)


def _difference(a: dict, b: dict, key: str) -> str:
    import numpy as np

    d = np.asarray(a[key]["per_image"]) - np.asarray(b[key]["per_image"])
    return f"{d.mean():+.4f} +- {d.std(ddof=1) / np.sqrt(len(d)):.4f}"


def _tables(records: dict, args) -> str:
    lines = [f"{args.steps} steps per variant, the VLB on all 500 test digits, the ODE on the first {args.num_ode} "
             f"(commit {records[BASELINE]['commit'] if BASELINE in records else '?'}); bits/dim +- standard error; "
             "paired: minus the baseline on the same images.", "",
             "| variant | VLB | paired | ODE, uniform | paired | ODE, truncated normal | paired | train min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in VARIANTS:
        if name not in records:
            continue
        r = records[name]
        cells = []
        for key, _, _ in BOUNDS:
            if key not in r:
                cells += ["not measured", ""]
                continue
            b = r[key]
            cells.append(f"{b['bpd']:.3f} +- {b['bpd_se']:.3f}")
            cells.append("(baseline)" if name == BASELINE else f"{b['minus_baseline']:+.3f} +- {b['minus_baseline_se']:.3f}")
        lines.append(f"| {r['what']} | " + " | ".join(cells) + f" | {r['train_seconds'] / 60:.1f} |")
    if "idode_finetuned" in records and "idode_control" in records:
        lines += ["", "Fine-tuned minus the control (the same steps without the term), per image: " + ", ".join(
            f"{label} {_difference(records['idode_finetuned'], records['idode_control'], key)}"
            for label, key in (("VLB", "vlb"), ("ODE uniform", "ode_uniform"), ("ODE truncated", "ode_truncated"))
            if key in records["idode_finetuned"] and key in records["idode_control"])]
    return "\n".join(lines)


def _plot(records: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in VARIANTS:
        if name in records and records[name]["curve"]:
            steps, bpd, se = zip(*records[name]["curve"])
            ax.errorbar(steps, bpd, yerr=se, marker="o", capsize=3, label=records[name]["what"])
    ax.set_xlabel("training step")
    ax.set_ylabel("test bits/dim (VLB, 500 digits)")
    ax.set_title("The likelihood frontier on the embedded MNIST digits")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS),
                        help="run these variants (default: all; with --tiny: TINY_VARIANTS)")
    parser.add_argument("--workroot", default=None, help="default workdirs/likelihood; with --tiny: <out>/runs")
    parser.add_argument("--steps", type=int, default=None, help="default 2000; with --tiny 2")
    parser.add_argument("--eval_every", type=int, default=None, help="default 500; with --tiny 1")
    parser.add_argument("--num_ode", type=int, default=None,
                        help="test digits for the ODE's bounds (default 20; with --tiny 2)")
    parser.add_argument("--finetune_steps", type=int, default=None,
                        help="steps of the variants that continue one (the second-order term: 0.4 steps/s on 2 cores; "
                             "default 150, with --tiny 0)")
    common.add_output_flags(parser)
    args = parser.parse_args(argv)
    out = common.output_dir(args, HERE)
    defaults = ({"workroot": os.path.join(out, "runs"), "steps": 2, "eval_every": 1, "num_ode": 2, "finetune_steps": 0,
                 "only": list(TINY_VARIANTS)} if args.tiny else
                {"workroot": "workdirs/likelihood", "steps": 2000, "eval_every": 500, "num_ode": 20,
                 "finetune_steps": 150, "only": list(VARIANTS)})
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps % args.eval_every:
        sys.exit(f"error: --steps={args.steps} must be a multiple of --eval_every={args.eval_every}")
    path = os.path.join(out, "results.json")
    records = {r["variant"]: r for r in json.load(open(path))["variants"]} if os.path.exists(path) else {}
    for name in args.only or list(VARIANTS):
        records[name] = _run(name, args) | {"commit": common.commit()}
        print({k: v for k, v in records[name].items() if k in ("variant", "bpd", "bpd_se", "train_seconds")},
              flush=True)
    if BASELINE in records:
        for name, r in records.items():
            _paired(r, records[BASELINE])
    ordered = [records[n] for n in VARIANTS if n in records]
    record = {"steps": args.steps, "num_ode": args.num_ode, "variants": ordered}
    common.write_results(out, record, _tables(records, args), name="results")
    _plot(records, os.path.join(out, "study.png"))
    print(_tables(records, args))
    return record


if __name__ == "__main__":
    main()
