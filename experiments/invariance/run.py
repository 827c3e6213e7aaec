"""Invariance of the continuous-time VLB to the noise schedule, on a trained MNIST model.

    python -m vdm.main --config configs/mnist.py --workdir workdirs/mnist      # or: make demo
    python experiments/invariance/run.py --config configs/mnist.py --workdir workdirs/mnist
    python experiments/invariance/run.py --tiny --out /tmp/invariance   # every stage in seconds (common.TINY)

VDM (Kingma et al. 2021, Sec. 5.1, Eq. 18): with the network a function of (z, gamma), the
diffusion loss L_inf = 0.5 E_t [gamma'(t) ||eps - eps_hat(z_t, gamma_t)||^2] depends on the
schedule gamma(t) only through its endpoints gamma_0, gamma_1; the schedule's shape changes
the variance of the Monte Carlo estimate, not its mean. The trained demo network takes gamma
itself as input, so any schedule with the learned endpoints is a valid reparametrisation of
the same model. This script estimates the VLB and its L_inf (one t, iid, and one eps per draw;
the library's one road to the bound, ``vdm.objective.estimate`` with ``schedule=``) on the test digits,
``--draws`` times each, under four
schedules with the learned endpoints: the learned one, linear, cosine-shaped and a
deliberately odd one (flat, then a steep sigmoid rise). The prior and reconstruction terms
depend only on the endpoints, so the VLB differs between schedules only through L_inf.
The exact reference: Gaussian data N(0, 0.5^2 I_784) with its Bayes-optimal denoiser, whose
E[L_inf] has a closed form (``vdm.analytic``), estimated under the same four schedules.

Writes ``results.json``, ``schedules.png`` and the table of ``README.md`` beside this file (or in ``--out``).
``--tiny``: the tiny demo model (the config with ``common.TINY`` and ``common.DEMO``), trained ``common.TINY_STEPS``
steps in ``--workdir`` (default ``<out>/model``) unless it is there, ``TINY_IMAGES`` test digits x 2 draws, and of
the four schedules those of ``TINY_SCHEDULES`` (the learned one, the reference of the paired differences, and the
odd one), on the digits and the Gaussian data: checks the script, measures nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

TINY_IMAGES = 16
TINY_SCHEDULES = ("learned", "odd")  # --tiny: each schedule is one more compilation of the bound


def schedules_with_endpoints(learned, g0: float, g1: float) -> dict:
    """The four schedules t -> gamma [B], each from gamma(0) = g0 to gamma(1) = g1."""
    import jax

    from vdm import diffusion, schedules

    def odd(t):  # flat until t ~ 0.7, then a steep sigmoid rise: monotone, the same endpoints
        s, lo, hi = jax.nn.sigmoid(40.0 * (t - 0.8)), jax.nn.sigmoid(-32.0), jax.nn.sigmoid(8.0)
        return g0 + (g1 - g0) * (s - lo) / (hi - lo)

    # plain functions declare no endpoints: the bound takes theirs at t = 0 and 1
    return {"learned": diffusion.FunctionSchedule(learned),
            "linear": diffusion.FunctionSchedule(lambda t: g0 + (g1 - g0) * t),
            "cosine": schedules.build("cosine", gamma_min=g0, gamma_max=g1), "odd": diffusion.FunctionSchedule(odd)}


def summary(values, num_dims: int) -> dict:
    """values [draws, N] of one estimator in nats -> mean, its standard error over the images, the
    Monte Carlo std of one draw for a fixed image, and the std of one draw over images and draws (bits/dim)."""
    import numpy as np

    bpd = np.asarray(values, np.float64) / (num_dims * np.log(2.0))
    per_image = bpd.mean(axis=0)
    return {"mean": float(bpd.mean()), "se": float(per_image.std(ddof=1) / np.sqrt(bpd.shape[1])),
            "mc_std": float(np.sqrt(np.mean(bpd.var(axis=0, ddof=1)))), "std": float(bpd.std(ddof=1)),
            "per_image": per_image}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist.py")
    parser.add_argument("--workdir", default=None, help="the trained model (default workdirs/mnist; with --tiny: "
                                                        "<out>/model, trained there if missing)")
    parser.add_argument("--draws", type=int, default=None, help="estimates per test image and schedule (default 16; "
                                                                "with --tiny 2)")
    parser.add_argument("--batch_size", type=int, default=None, help="default 250; with --tiny 8")
    parser.add_argument("--images", type=int, default=None, help="the first N test digits (default all; with --tiny "
                                                                 f"{TINY_IMAGES})")
    parser.add_argument("--seed", type=int, default=0)
    common.add_output_flags(parser)
    args = parser.parse_args(argv)
    out = common.output_dir(args, HERE)
    tiny = args.tiny
    args.workdir = args.workdir or (os.path.join(out, "model") if tiny else "workdirs/mnist")
    args.draws = args.draws or (2 if tiny else 16)
    args.batch_size = args.batch_size or (8 if tiny else 250)
    args.images = args.images or (TINY_IMAGES if tiny else None)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from common import commit, mean_se, restore, write_results
    from vdm import analytic, diffusion
    from vdm import model as model_lib
    from vdm import objective as objective_lib

    began = time.perf_counter()
    overrides = common.tiny_model(args.config, args.workdir, common.DEMO) if tiny else {}
    trainer, step = restore(args.config, args.workdir, overrides)
    model = nnx.merge(trainer.graphdef, trainer.state.ema_params)
    info = trainer.dataset.info
    x = np.asarray(trainer.dataset.test.images)[:args.images]
    trainer.close()
    _, gamma_fn = model_lib.pure_functions(model)
    g0, g1 = (float(g) for g in diffusion.schedule_endpoints(model.schedule))
    table = schedules_with_endpoints(gamma_fn, g0, g1)
    if tiny:
        table = {name: schedule for name, schedule in table.items() if name in TINY_SCHEDULES}
    num_dims = int(np.prod(info.shape))

    evaluation = objective_lib.EVALUATION  # the true VLB: elbo, iid t, no dropout

    rows, per_image = [], {}
    for name, schedule in table.items():
        @jax.jit
        def bound(xb, key, schedule=schedule):  # (diffusion term, prior + reconstruction), nats per image
            d = objective_lib.draw_for_step(key, len(xb), evaluation)
            b = objective_lib.estimate(model, {"image": xb}, d, evaluation, train=False, schedule=schedule)
            return b.diffusion, b.prior + b.reconstruction

        values, other = np.zeros((args.draws, len(x))), np.zeros((args.draws, len(x)))
        for d in range(args.draws):
            for i in range(0, len(x), args.batch_size):
                key = jax.random.fold_in(jax.random.PRNGKey(args.seed), d * 100_000 + i)
                diff, ends = bound(jnp.asarray(x[i:i + args.batch_size]), key)
                values[d, i:i + args.batch_size], other[d, i:i + args.batch_size] = np.asarray(diff), np.asarray(ends)
        diff, vlb = summary(values, num_dims), summary(values + other, num_dims)
        per_image[name] = diff.pop("per_image")
        vlb.pop("per_image")
        rows.append({"schedule": name, "diffusion": diff, "vlb": vlb})
        print(name, {k: round(v, 4) for k, v in diff.items()}, flush=True)
    for row in rows:  # paired with the learned schedule: the same images, so the data's spread cancels
        d = per_image[row["schedule"]] - per_image["learned"]
        row["minus_learned"] = mean_se(d)

    data = analytic.GaussianData(dim=num_dims, scale=0.5)
    exact = data.continuous_loss(g0, g1) / (num_dims * np.log(2.0))
    gaussian = []
    for name, schedule in table.items():
        z = data.sample(jax.random.PRNGKey(args.seed + 1), len(x) * args.draws)
        nats = diffusion.diffusion_loss(jax.random.PRNGKey(args.seed + 2), z, schedule, data.eps_fn, time_sampler="iid")
        bpd = np.asarray(nats, np.float64) / (num_dims * np.log(2.0))
        gaussian.append({"schedule": name, **mean_se(bpd), "std": float(bpd.std(ddof=1))})

    record = {"config": args.config, "step": step, "images": len(x), "draws": args.draws, "gamma_0": g0, "gamma_1": g1,
              "mnist": rows, "gaussian_exact_bpd": float(exact), "gaussian": gaussian, "commit": commit(),
              "seconds": round(time.perf_counter() - began, 1), "device": jax.devices()[0].device_kind}
    _plot(table, rows, os.path.join(out, "schedules.png"))
    write_results(out, record, _tables(record))
    return record


def _plot(table, rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    t = jnp.linspace(0.0, 1.0, 201)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, schedule in table.items():
        a.plot(t, -np.asarray(schedule(t)), label=name)
    a.set_xlabel("t"); a.set_ylabel("log SNR = -gamma(t)"); a.legend(); a.set_title("four schedules, the same endpoints")
    names = [r["schedule"] for r in rows]
    means = [r["diffusion"]["mean"] for r in rows]
    b.errorbar(range(len(rows)), means, yerr=[2 * r["diffusion"]["se"] for r in rows], fmt="o", capsize=4,
               label="mean +- 2 SE")
    b2 = b.twinx()
    b2.bar(range(len(rows)), [r["diffusion"]["mc_std"] for r in rows], alpha=0.25, color="C1")
    b2.set_ylabel("Monte Carlo std of one draw (bars)")
    b.set_xticks(range(len(rows)), names); b.set_ylabel("L_inf, bits/dim")
    b.set_title("the same mean, different variances")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tables(r: dict) -> str:
    lines = [f"Demo checkpoint (step {r['step']}), {r['images']} test digits x {r['draws']} draws per schedule; "
             f"endpoints gamma_0 = {r['gamma_0']:.3f}, gamma_1 = {r['gamma_1']:.3f}. Bits/dim; SE over the images; "
             f"\"MC std\": the standard deviation of one draw for a fixed image. Commit {r['commit']}, "
             f"{r['seconds'] / 60:.1f} min on {r['device']}.", "",
             "| schedule | L_inf | SE | minus learned (paired) | MC std of one draw | VLB | SE |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["mnist"]:
        d, v, m = row["diffusion"], row["vlb"], row["minus_learned"]
        paired = "" if row["schedule"] == "learned" else f"{m['mean']:+.4f} +- {m['se']:.4f}"
        lines.append(f"| {row['schedule']} | {d['mean']:.4f} | {d['se']:.4f} | {paired} | {d['mc_std']:.3f} | "
                     f"{v['mean']:.4f} | {v['se']:.4f} |")
    lines += ["", f"Exact reference: Gaussian data N(0, 0.5^2 I_784) with its Bayes-optimal denoiser, the same endpoints; "
                  f"closed form E[L_inf] = {r['gaussian_exact_bpd']:.5f} bits/dim.", "",
              "| schedule | Monte Carlo estimate | SE | (estimate - exact) / SE | std of one draw |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {g['schedule']} | {g['mean']:.5f} | {g['se']:.5f} | "
              f"{(g['mean'] - r['gaussian_exact_bpd']) / g['se']:+.1f} "
              f"| {g['std']:.4f} |" for g in r["gaussian"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
