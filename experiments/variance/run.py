"""Variance of the Monte Carlo loss estimate on a trained MNIST model: time sampler, schedule,
importance sampling of the noise level, and the variance-minimising schedule gradient (VDM App. I.2).

    python -m vdm.main --config configs/mnist.py --workdir workdirs/mnist        # train (make demo)
    python experiments/variance/run.py --config configs/mnist.py --workdir workdirs/mnist
    python experiments/variance/run.py --tiny --out /tmp/variance   # every stage in seconds (common.TINY)

Every estimate is the library's: ``vdm.objective.draw`` and ``vdm.objective.estimate`` (what
training and evaluation run), with the time sampler, schedule and log-SNR density of each row.
The test digits are cut into batches of ``--batch_size`` (the demo's training batch), in a new
random order for each of ``--num_draws`` passes, so every digit gets ``--num_draws`` estimates.
Per row: the mean with its standard error (over the digits), the per-example std of one
estimate and the std of a batch's mean. Two objectives: the VLB's diffusion term (elbo
weighting) and the trained one (the config's weighting). Importance sampling draws log-SNR on
the learned schedule's range [-gamma_1, -gamma_0] from p proportional to the weighting, or
from the adaptive density of Kingma & Gao (App. F), fitted first on ``--fit_batches`` batches
of training digits. Last, two short runs of a smaller model (continuous-time elbo, uniform t)
with ``loss.variance_schedule_grad`` off and on, in ``<workdir>_schedule_grad_off`` / ``_on``
(resumed if there: a second call only evaluates).

Writes ``results.json``, ``variance.png`` and the tables of ``README.md`` beside this file (or in ``--out``).
``--tiny``: the tiny demo model (the config with ``common.TINY`` and ``common.DEMO``: trained on the elbo, so its rows
are the VLB's only), trained ``common.TINY_STEPS`` steps in ``--workdir`` (default ``<out>/model``) unless it is there,
the flags' budgets at ``TINY_ARGS`` (a few test digits, draws and batches; the rows of ``TINY_SAMPLERS``); of the
small runs the one with the schedule gradient on (``TINY_RUNS``), on ``common.TINY``'s network and sampler with the
config's own learned schedule, and its estimators of ``TINY_SMALL``: checks the script, measures nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

SAMPLERS = {"iid": "iid", "low_discrepancy": "low-discrepancy"}
TINY_SAMPLERS = {"iid": "iid"}  # --tiny: the rows of one time sampler (the adaptive density is fitted with the other)
# --tiny: the small run with the schedule gradient (each run: one more config to compile), and of its estimators those
# that its plot and table need (its schedule against the fixed linear one)
TINY_RUNS, TINY_SMALL = (True,), ("own schedule, iid", "fixed linear schedule, iid")
# --tiny's budget, in place of the defaults of these flags
TINY_ARGS = {"num_draws": 2, "batch_size": 8, "images": 16, "density_bins": 10, "fit_batches": 1, "fit_batch_size": 8,
             "bins": 4, "small_steps": common.TINY_STEPS}
DEFAULT_ARGS = {"num_draws": 16, "batch_size": 32, "images": 0, "density_bins": 100, "fit_batches": 50,
                "fit_batch_size": 250, "bins": 25, "small_steps": 1000}


def small_config(args, variance_grad: bool):
    """The config of the App. I.2 comparison: ``args.config`` with the elbo, a smaller network (``--tiny``:
    ``common.TINY``'s), fewer steps."""
    from vdm import configlib, train

    # --tiny: common.TINY but for its fixed schedule (the schedule gradient needs a learned interior)
    config = train.resolve_config(args.config, {k: v for k, v in common.TINY.items() if k != "model.schedule"}
                                  if args.tiny else {})
    config.loss.weighting = "elbo"
    configlib.drop_stale_kwargs(config, {"loss.weighting"})
    config.loss.variance_schedule_grad = variance_grad
    if not args.tiny:  # common.TINY's MLP has no channels
        config.model.network_kwargs.channels = args.small_channels
    config.train.num_steps = args.small_steps
    config.train.checkpoint_every = args.small_steps
    config.train.log_every = 50
    config.train.eval_every = 10 * args.small_steps  # no evaluation during the run
    config.eval.num_examples = 50  # the run's own closing evaluation; this script measures its own
    if not args.tiny:  # --tiny: common.TINY's sampler
        config.sample.num_images = 4
        config.sample.steps = 16
    config.sample.fd_mnist = False
    return config


class Study:
    """One trained model: its parameters, endpoints and test digits, and the estimators to compare."""

    def __init__(self, trainer, args):
        import numpy as np
        from flax import nnx

        from vdm import data as data_lib

        self.trainer, self.args = trainer, args
        self.params = trainer.state.ema_params
        self.gamma_0, self.gamma_1 = (float(g) for g in nnx.merge(trainer.graphdef, self.params).schedule.endpoints())
        test = trainer.dataset.test  # the first N digits (of --images, if given), N a multiple of the batch size
        rows = np.arange(min(len(test), args.images or len(test)) // args.batch_size * args.batch_size)
        self.images = np.asarray(data_lib.read_rows(test, rows)["image"])

    def objective(self, weighting, time_sampler: str, importance_sampling: str = ""):
        from vdm import objective as objective_lib

        return objective_lib.Objective(weighting=weighting, time_sampler=time_sampler,
                                       importance_sampling=importance_sampling, density_bins=self.args.density_bins,
                                       logsnr_range=(-self.gamma_1, -self.gamma_0))

    def terms_fn(self, objective, linear: bool = False):
        """jit (params, image, key, density) -> (terms, u) of one batch, with the learned or a linear schedule."""
        import jax
        from flax import nnx

        from vdm import objective as objective_lib
        from vdm import schedules

        def fn(params, image, key, density):
            model = nnx.merge(self.trainer.graphdef, params)
            schedule = schedules.build("fixed_linear", gamma_min=self.gamma_0, gamma_max=self.gamma_1) if linear else None
            d = objective_lib.draw_for_step(key, image.shape[0], objective)
            bound = objective_lib.estimate(model, {"image": image}, d, objective, density, train=False,
                                           schedule=schedule)
            return bound, d.u

        return jax.jit(fn)

    def estimates(self, objective, linear: bool = False, density=None) -> dict:
        """Per-example trained diffusion term (bits/dim) and t, [K, batches, B], over the test digits."""
        import numpy as np

        from vdm import diffusion

        fn = self.terms_fn(objective, linear)
        dims = int(np.prod(self.images.shape[1:]))

        def one(image, key):
            bound, u = fn(self.params, image, key, density)
            return {"loss": diffusion.bits_per_dim(bound.weighted, dims), "t": u}

        return common.draws(one, self.images, self.args.batch_size, self.args.num_draws, self.args.seed)

    def fitted_adaptive_density(self, weighting):
        """The adaptive density, fitted on training digits with the library's update (``Objective.update_density``)."""
        import jax
        import numpy as np

        from vdm import data as data_lib
        from vdm import time_sampling

        objective = self.objective(weighting, "low_discrepancy", "adaptive")
        density = time_sampling.build_density("adaptive", weighting, -self.gamma_1, -self.gamma_0,
                                              num_bins=self.args.density_bins, decay=self.args.fit_decay)
        fn = self.terms_fn(objective)
        update = jax.jit(objective.update_density)
        rng = np.random.default_rng(self.args.seed + 1)
        train = self.trainer.dataset.train
        for i in range(self.args.fit_batches):
            image = data_lib.read_rows(train, rng.choice(len(train), self.args.fit_batch_size, replace=False))["image"]
            bound, _ = fn(self.params, image, jax.random.PRNGKey(10_000 + i), density)
            density = update(density, bound)
        return density

    def rows(self, weighting, label: str) -> tuple[list, dict]:
        """The rows of one objective (and the raw estimates of the uniform-t rows, for the per-t plot)."""
        from vdm import time_sampling

        dens = {"weighting": time_sampling.build_density("weighting", weighting, -self.gamma_1, -self.gamma_0,
                                                         num_bins=self.args.density_bins),
                "adaptive": self.fitted_adaptive_density(weighting)}
        samplers = TINY_SAMPLERS if self.args.tiny else SAMPLERS
        cases = [(f"learned schedule, {SAMPLERS[s]}", s, False, "") for s in SAMPLERS]
        cases += [(f"fixed linear schedule, {SAMPLERS[s]}", s, True, "") for s in SAMPLERS]
        cases += [(f"importance sampling, p ~ w, {SAMPLERS[s]}", s, False, "weighting") for s in SAMPLERS]
        cases += [(f"importance sampling, adaptive p, {SAMPLERS[s]}", s, False, "adaptive") for s in SAMPLERS]
        rows, raw = [], {}
        for name, sampler, linear, density in [c for c in cases if c[1] in samplers]:
            start = time.perf_counter()
            v = self.estimates(self.objective(weighting, sampler, density), linear, dens.get(density))
            rows.append({"objective": label, "estimator": name} | common.summary(v["loss"], v["image"]))
            if not density:
                raw[name] = v
            print(f"{label} / {name}: {rows[-1]['mean']:.3f} +- {rows[-1]['se']:.3f}, std {rows[-1]['std_example']:.2f} "
                  f"/ {rows[-1]['std_batch']:.3f} ({time.perf_counter() - start:.1f} s)", flush=True)
        return rows, raw

    def curve(self, linear: bool = False):
        """log SNR(t) = -gamma(t) on a grid."""
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from vdm import schedules

        t = jnp.linspace(0.0, 1.0, 201)
        schedule = (schedules.build("fixed_linear", gamma_min=self.gamma_0, gamma_max=self.gamma_1) if linear
                    else nnx.merge(self.trainer.graphdef, self.params).schedule)
        return (-np.asarray(schedule(t))).tolist()


def variance_change(a: dict, b: dict) -> dict:
    """Var(a) / Var(b) - 1 with its standard error, for two estimators of the same mean on the same draws
    (the same digits, batches and keys): the change of the second moment over Var(b), with the standard
    error of the digits' paired mean differences of squares."""
    import numpy as np

    if not np.array_equal(a["image"], b["image"]):
        raise ValueError("variance_change needs the same draws")
    k, n = a["loss"].shape[0], a["image"].size // a["loss"].shape[0]
    d = np.bincount(a["image"].ravel(), weights=(a["loss"] ** 2 - b["loss"] ** 2).ravel(), minlength=n) / k
    var_b = b["loss"].var(ddof=1)
    return {"change": float(d.mean() / var_b), "se": float(d.std(ddof=1) / np.sqrt(n) / var_b)}


def max_from_linear(study) -> float:
    """The largest |log SNR(t) - linear| over t: how far a learned schedule is from the line between its endpoints."""
    import numpy as np

    return float(np.max(np.abs(np.asarray(study.curve()) - np.asarray(study.curve(linear=True)))))


def binned(v: dict, num_bins: int) -> dict:
    """The per-example estimate binned over t: mean, 10% and 90% quantiles per bin."""
    import numpy as np

    t, loss = v["t"].ravel(), v["loss"].ravel()
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    k = np.clip(np.digitize(t, edges) - 1, 0, num_bins - 1)
    out = {"t": (0.5 * (edges[1:] + edges[:-1])).tolist(), "mean": [], "q10": [], "q90": []}
    for i in range(num_bins):
        x = loss[k == i]
        out["mean"].append(float(x.mean()))
        out["q10"].append(float(np.quantile(x, 0.1)))
        out["q90"].append(float(np.quantile(x, 0.9)))
    return out


def schedule_grad_rows(args) -> tuple[list, dict, dict, list]:
    """Train (or resume) the two small models, then their estimators: own schedule iid / LD, linear iid."""
    from vdm import train, weightings

    rows, curves, per_t, runs = [], {}, {}, []
    for flag in TINY_RUNS if args.tiny else (False, True):
        label = f"schedule gradient {'on' if flag else 'off'}"
        workdir = f"{args.workdir.rstrip('/')}_schedule_grad_{'on' if flag else 'off'}"
        config = small_config(args, flag)
        start = time.perf_counter()
        result = train.train_and_evaluate(config, workdir)
        runs.append({"run": label, "workdir": workdir, "seconds": time.perf_counter() - start,
                     "eval_bpd": result.get("bpd")})
        trainer = train.Trainer(config, workdir, must_exist=True)
        try:
            trainer.restore_latest()
            study = Study(trainer, args)
            elbo = weightings.build("elbo")
            adaptive = None if args.tiny else study.fitted_adaptive_density(elbo)
            raw = {}
            cases = [("own schedule, iid", "iid", False, None),
                     ("own schedule, low-discrepancy", "low_discrepancy", False, None),
                     ("fixed linear schedule, iid", "iid", True, None),
                     ("importance sampling, adaptive p, iid", "iid", False, adaptive)]
            for name, sampler, linear, density in [c for c in cases if c[0] in TINY_SMALL] if args.tiny else cases:
                objective = study.objective(elbo, sampler, "" if density is None else "adaptive")
                raw[name] = v = study.estimates(objective, linear, density)
                rows.append({"objective": label, "estimator": name} | common.summary(v["loss"], v["image"]))
            per_t[label] = binned(raw["own schedule, iid"], args.bins)
            curves[label] = study.curve()
            runs[-1] |= {"step": int(trainer.state.step), "gamma_0": study.gamma_0, "gamma_1": study.gamma_1,
                         "max_from_linear": max_from_linear(study),
                         "variance_vs_linear": variance_change(raw["own schedule, iid"],
                                                               raw["fixed linear schedule, iid"])}
        finally:
            trainer.close()
    return rows, curves, per_t, runs


def plot(path, record):
    import numpy as np

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(2, 2, figsize=(12, 9))
    t = np.linspace(0.0, 1.0, 201)
    inset = ax[0, 0].inset_axes([0.55, 0.58, 0.42, 0.38])
    for name, y in record["curves"].items():
        line, = ax[0, 0].plot(t, y, label=name)
        if "linear" not in name:  # a learned schedule minus the line between its endpoints
            y = np.asarray(y)
            inset.plot(t, y - (y[0] + (y[-1] - y[0]) * t), color=line.get_color())
    inset.set_title("learned - linear", fontsize=7)
    inset.tick_params(labelsize=6)
    ax[0, 0].set(xlabel="t", ylabel="log SNR(t) = -gamma(t)", title="schedules")
    ax[0, 0].legend(fontsize=7, loc="lower left")
    for panel, per_t, title in ((ax[0, 1], record["per_t"], "demo model: VLB integrand over t (iid t)"),
                                (ax[1, 0], record["per_t_small"], "small models (elbo): VLB integrand, own schedule")):
        for name, b in per_t.items():
            line, = panel.plot(b["t"], b["mean"], label=f"{name}: mean")
            panel.fill_between(b["t"], b["q10"], b["q90"], color=line.get_color(), alpha=0.2,
                               label=f"{name}: 10-90%")
        panel.set(xlabel="t", ylabel="0.5 gamma'(t) ||eps - eps_hat||^2 (bits/dim)", yscale="log", title=title)
        panel.legend(fontsize=7)
    rows = record["rows"]
    y = np.arange(len(rows))
    ax[1, 1].barh(y, [r["std_batch"] for r in rows], color=["C0" if "elbo" in r["objective"] else "C1" for r in rows])
    ax[1, 1].set(yticks=y, yticklabels=[f"{r['objective'].split(' (')[0]}: {r['estimator']}" for r in rows],
                 xscale="log", xlabel=f"std of a batch mean (batch {record['batch_size']}, bits/dim)",
                 title="per-batch std")
    ax[1, 1].tick_params(axis="y", labelsize=6)
    ax[1, 1].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(record) -> str:
    def row(r):
        return (f"| {r['objective']} | {r['estimator']} | {r['mean']:.3f} +- {r['se']:.3f} | {r['std_example']:.2f} | "
                f"{r['mc_std']:.2f} | {r['std_batch']:.3f} |")

    head = ["| objective | estimator | mean +- SE, bits/dim | per-example std | MC std, fixed digit | per-batch std |",
            "| --- | --- | --- | --- | --- | --- |"]
    lines = [f"Trained model: `{record['config']}` at step {record['step']} (EMA), learned endpoints gamma_0 = "
             f"{record['gamma_0']:.3f}, gamma_1 = {record['gamma_1']:.3f}; {record['images']} test digits x "
             f"{record['num_draws']} estimates each, batches of {record['batch_size']}. Diffusion term in bits/dim; "
             f"standard errors over the digits. Adaptive densities fitted on {record['fit_batches']} batches of "
             f"{record['fit_batch_size']} training digits (EMA decay {record['fit_decay']}, "
             f"{record['density_bins']} bins).", ""] + head
    lines += [row(r) for r in record["rows"]]
    lines += ["", f"Variance-minimising schedule gradient (VDM App. I.2): two runs of `{record['config']}` with "
              f"`{record['small_overrides']}`, `loss.variance_schedule_grad` False / True; the VLB's diffusion term "
              "of each model under its own schedule and under the fixed linear one with its endpoints.", ""] + head
    lines += [row(r) for r in record["small_rows"]]
    def change(c):
        return f"{100 * c['change']:+.1f}% +- {100 * c['se']:.1f}%"

    lines += ["", "Each model's own schedule against the fixed linear one with its endpoints: how far it is in log SNR, "
              "and the change of the per-example variance (iid t) on the same draws.", "",
              "| run | steps | training wall time | gamma_0 | gamma_1 | max \\|log SNR - linear\\| | variance vs linear |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['run']} | {r['step']} | {r['seconds']:.0f} s | {r['gamma_0']:.3f} | {r['gamma_1']:.3f} | "
              f"{r['max_from_linear']:.3f} | {change(r['variance_vs_linear'])} |" for r in record["runs"]]
    lines += [f"| demo model (sigmoid weighting, learned schedule) | {record['step']} | | {record['gamma_0']:.3f} | "
              f"{record['gamma_1']:.3f} | {record['max_from_linear']:.3f} | {change(record['variance_vs_linear'])} |"]
    lines += ["", f"Commit `{record['commit']}`; wall time {record['seconds'] / 60:.1f} min in all, the two training "
              f"runs included, on {record['device']} (a shared, loaded 2-core machine)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist.py")
    parser.add_argument("--workdir", default=None, help="the trained model (default workdirs/mnist; with --tiny: "
                                                        "<out>/model, trained there if missing)")
    parser.add_argument("--num_draws", type=int, help="estimates per test digit and row (default 16)")
    parser.add_argument("--batch_size", type=int, help="default 32")
    parser.add_argument("--images", type=int, help="the first N test digits (default 0: all)")
    parser.add_argument("--density_bins", type=int, help="default 100")
    parser.add_argument("--fit_batches", type=int, help="default 50")
    parser.add_argument("--fit_batch_size", type=int, help="default 250")
    parser.add_argument("--fit_decay", type=float, default=0.9)
    parser.add_argument("--bins", type=int, help="t bins of the per-t plot (default 25)")
    parser.add_argument("--small_steps", type=int, help="default 1000")
    parser.add_argument("--small_channels", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    common.add_output_flags(parser)
    args = parser.parse_args(argv)
    out = common.output_dir(args, HERE)
    for key, value in ((TINY_ARGS if args.tiny else DEFAULT_ARGS) | {
            "workdir": os.path.join(out, "model") if args.tiny else "workdirs/mnist"}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    start, commit = time.perf_counter(), common.commit()

    import jax

    from vdm import objective as objective_lib
    from vdm import weightings

    overrides = common.tiny_model(args.config, args.workdir, common.DEMO) if args.tiny else {}
    trainer, step = common.restore(args.config, args.workdir, overrides)
    config = trainer.config
    try:
        study = Study(trainer, args)
        trained = objective_lib.Objective.from_config(config).weighting
        objectives = [(weightings.build("elbo"), "VLB (elbo)")]
        if not trained.is_elbo:
            objectives.append((trained, f"trained loss ({trained.name})"))
        rows, per_t = [], {}
        for weighting, label in objectives:
            r, raw = study.rows(weighting, label)
            rows += r
            if weighting.is_elbo:
                per_t = {name.split(",")[0]: binned(v, args.bins) for name, v in raw.items() if name.endswith(", iid")}
                learned_vs_linear = variance_change(raw["learned schedule, iid"], raw["fixed linear schedule, iid"])
        curves = {"demo: learned": study.curve(), "demo: fixed linear": study.curve(linear=True)}
        record = {"config": args.config, "step": step, "commit": commit, "gamma_0": study.gamma_0,
                  "gamma_1": study.gamma_1, "images": int(study.images.shape[0]),
                  "max_from_linear": max_from_linear(study), "variance_vs_linear": learned_vs_linear}
    finally:
        trainer.close()
    small_rows, small_curves, per_t_small, runs = schedule_grad_rows(args)
    record |= {k: getattr(args, k) for k in ("num_draws", "batch_size", "density_bins", "fit_batches",
                                             "fit_batch_size", "fit_decay", "small_steps", "small_channels")}
    network = "common.TINY's network" if args.tiny else f"model.network_kwargs.channels={args.small_channels}"
    record |= {"small_overrides": f"loss.weighting=elbo, {network}, "
                                  f"train.num_steps={args.small_steps} (learning rate: "
                                  f"{small_config(args, False).train.lr_schedule})",
               "rows": rows, "small_rows": small_rows, "runs": runs, "per_t": per_t, "per_t_small": per_t_small,
               "curves": curves | {f"small, {k}": v for k, v in small_curves.items()}}
    plot(os.path.join(out, "variance.png"), record)
    record["seconds"] = time.perf_counter() - start
    record["device"] = jax.devices()[0].device_kind
    common.write_results(out, record, tables(record))
    print(tables(record))
    return record


if __name__ == "__main__":
    main()
