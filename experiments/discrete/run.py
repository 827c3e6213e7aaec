"""Discrete vs continuous time: train the VLB with T = 10, 100, 1000 steps and in continuous time;
evaluate every model under every T.

    python experiments/discrete/run.py             # trains the four models, then evaluates (resumable)
    python experiments/discrete/run.py --steps 3500 --workroot workdirs/discrete_3500   # a longer budget
    python experiments/discrete/run.py --tiny --out /tmp/discrete   # every stage in seconds (common.TINY)

The VDM paper (Sec. 4, Fig. 3) shows that for a fixed model the T-step bound L_T only falls as T
grows (doubling T never hurts), so the continuous-time L_inf is the tightest, and that training
with more steps, or in continuous time, gives the best model. Each model here is the demo config
(``--config``) with the elbo weighting and ``loss.timesteps = T`` (0: continuous), trained from
scratch for ``--steps`` steps (the learning rate warmed up, then decayed to 0 by a cosine) in ``<workroot>/T<T>``
by ``vdm.train.train_and_evaluate``. Every
model is then evaluated on the 500 held-out digits with ``eval.timesteps`` = 10, 100, 1000 and
continuous (one pass, the same randomness for every model at a given T), so the table's rows
compare training objectives and its columns compare bounds. The differences to the continuous-
time model are paired per digit; their standard errors are over the digits.

Writes ``results.json``, ``discrete.png`` and the table of ``README.md`` beside this file (or in ``--out``).
``--tiny``: the models of ``TINY_MODELS`` (the continuous-time one only: on ``common.TINY_MNIST`` its config is the
tiny demo model's, ``common.DEMO``, whose compiled functions the other tiny studies share), ``common.TINY_STEPS``
steps, evaluated under the T of ``TINY_EVAL`` (a discrete-time bound and L_inf: each T is one more compiled
evaluation) on a few digits, in ``<out>/runs``: the whole study for checking the script, not for figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

STEPS = (10, 100, 1000, 0)  # 0: continuous time
TINY_MODELS, TINY_EVAL = (0,), (10, 0)  # --tiny: the models trained, and the T each is evaluated under


def _name(t: int) -> str:
    return f"T = {t}" if t else "continuous"


def _evaluate(config_spec: str, workdir: str, overrides: dict, eval_steps: int):
    """Per-digit test bits/dim of the model in ``workdir`` under the ``eval_steps``-step bound (``overrides``: of
    any of the models: evaluation reads the model and ``eval``, not the objective it was trained with)."""
    from vdm import train

    config = train.resolve_config(config_spec, overrides | {"eval.timesteps": eval_steps})
    trainer = train.Trainer(config, workdir, must_exist=True)
    try:
        trainer.restore_latest()
        return trainer.evaluate(per_example=True)["per_example"]["bpd"]
    finally:
        trainer.close()


def _evaluated(record) -> list[int]:
    """The T each model was evaluated under (STEPS; with --tiny TINY_EVAL), in that order."""
    return [int(t) for t in record["rows"][0]["bpd"]]


def _figure(record, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    columns = [t for t in _evaluated(record) if t]
    for k, row in enumerate(record["rows"]):
        means = [row["bpd"][str(t)]["mean"] for t in columns]
        errors = [row["bpd"][str(t)]["se"] for t in columns]
        ax.errorbar(columns, means, yerr=errors, marker="o", capsize=3, color=f"C{k}", label=f"trained: {row['name']}")
        ax.axhline(row["bpd"]["0"]["mean"], color=f"C{k}", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("T of the evaluated bound L_T (dotted: L_inf)")
    ax.set_ylabel("test bits/dim")
    ax.set_title("The VLB of each model under each T")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tables(record) -> str:
    rows, steps = record["rows"], _evaluated(record)
    lines = [f"`{record['config']}` with the elbo weighting: {rows[0]['steps']} steps of {rows[0]['batch_size']} digits "
             f"({record.get('lr_schedule', 'cosine')} learning rate), "
             "2-core CPU. Test bits/dim on the 500 held-out digits (+- standard error over the digits); "
             "rows: how the model was trained; columns: the bound it is evaluated with.", "",
             "| trained with | " + " | ".join(f"L_{t or 'inf'}" for t in steps) + " | wall time |",
             "| --- " * (len(steps) + 2) + "|"]
    for row in rows:
        cells = [f"{row['bpd'][str(t)]['mean']:.3f} +- {row['bpd'][str(t)]['se']:.3f}" for t in steps]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {row['train_seconds'] / 60:.1f} min |")
    lines += ["", "Differences to the continuous-time model's L_inf, paired per digit (same digits, same randomness): "
              "each model's own bound (L_T of a T-step model), and its L_inf (the models compared on one bound).", "",
              "| trained with | own bound | own bound minus continuous L_inf | L_inf minus continuous L_inf |",
              "| --- | --- | --- | --- |"]
    for row in rows:
        own, inf = row["own_minus_continuous"], row["inf_minus_continuous"]
        lines.append(f"| {row['name']} | {row['bpd'][str(row['T'])]['mean']:.3f} | {own['mean']:+.3f} +- {own['se']:.3f} | "
                     f"{inf['mean']:+.3f} +- {inf['se']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="mnist", help="the base config: a shipped name or a file")
    parser.add_argument("--workroot", default=None, help="one workdir per T under it (default workdirs/discrete; "
                                                         "with --tiny: <out>/runs)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each model (default 1500; with "
                                                                "--tiny: common.TINY_STEPS)")
    parser.add_argument("--lr_schedule", default="cosine", choices=("constant", "cosine"), help="after the warm-up")
    common.add_output_flags(parser)
    args = parser.parse_args(argv)
    out = common.output_dir(args, HERE)
    args.workroot = args.workroot or (os.path.join(out, "runs") if args.tiny else "workdirs/discrete")
    args.steps = args.steps or (common.TINY_STEPS if args.tiny else 1500)

    from vdm import train

    tiny = common.TINY_MNIST if args.tiny else {}
    base = train.resolve_config(args.config, tiny)
    models = {}
    for t in TINY_MODELS if args.tiny else STEPS:
        workdir = os.path.join(args.workroot, f"T{t}")
        # The whole budget named here, so that a change of the demo config does not change the study.
        overrides = tiny | {"loss.weighting": "elbo", "loss.timesteps": t, "eval.timesteps": t,
                            "train.num_steps": args.steps, "train.checkpoint_every": args.steps,
                            "train.lr_schedule": args.lr_schedule}
        print(f"== trained with {_name(t)} -> {workdir}", flush=True)
        models[t] = (workdir, overrides, common.trained(args.config, workdir, overrides))
    # Every model with one config per T (the continuous-time model's: the models differ only in loss.timesteps,
    # which evaluation does not read): one compiled evaluation per T, not one per model and T.
    evaluation, evaluated = models[0][1], TINY_EVAL if args.tiny else STEPS
    per_digit = {t: {e: _evaluate(args.config, w, evaluation, e) for e in evaluated} for t, (w, _, _) in models.items()}
    rows = []
    for t, (workdir, overrides, result) in models.items():
        row = {"name": _name(t), "T": t, "workdir": workdir, "step": result["step"], "steps": result["step"],
               "batch_size": base.train.batch_size, "train_seconds": result["train_seconds"],
               "bpd": {str(e): common.mean_se(per_digit[t][e]) for e in evaluated},
               "own_minus_continuous": common.mean_se(per_digit[t][t] - per_digit[0][0]),
               "inf_minus_continuous": common.mean_se(per_digit[t][0] - per_digit[0][0]), "commit": common.commit()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    record = {"config": args.config, "workroot": args.workroot, "lr_schedule": args.lr_schedule, "rows": rows}
    _figure(record, os.path.join(out, "discrete.png"))
    common.write_results(out, record, _tables(record))
    return record


if __name__ == "__main__":
    main()
