"""A figure quoted in several places has one source, and every copy quotes it as the source has it.

``FIGURES`` is the table: each row names its source (a study's ``results.json``, or the text that states a
measurement: a config's docstring, a module's docstring, a study's README), the key of the figure there, the
precision it is quoted at, and its copies, each a file and the words around the figure (``{}`` where the figure
stands, ``{*}`` for another number on the way). A copy that says another figure, or whose words changed so that
the figure cannot be found, fails with the file, the words and both figures. Reading files only: no training.

The other checks: the paths the README names exist, and the config fields it and the config docstrings name
(``--config.x.y``, ``config.x.y``); every shipped config is in the README's table; every study script writes what
the README says the studies write.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import re
from typing import Callable, NamedTuple

import pytest
from conftest import ROOT

NUM = r"[-+]?\d[\d,]*(?:\.\d+)?"
FIGURE = rf"{NUM}(?:(?: \+- | to ){NUM})?"  # 2.36 | 2.36 +- 0.09 | 14 to 22


class Figure(NamedTuple):
    source: str  # a file relative to the repository: .json (its data) or text (a regex with one group)
    key: object  # .json: a path such as "rows[name=elbo].bpd", a tuple of paths, or a callable(data) -> values
    fmt: object  # how the copies quote it: a format string over the key's values, or a callable -> str
    copies: tuple  # (file, words around the figure) pairs


def _pm(value: float, se: float, digits: int = 2) -> str:
    return f"{value:.{digits}f} +- {se:.{digits}f}"


def _weightings_minutes(data) -> tuple[float, float]:
    minutes = [r["train_seconds"] / 60 for r in data["rows"] if r["train_seconds"] > 60]  # not the resumed one
    return min(minutes), max(minutes)


def _variance_range(objective: str, field: str) -> Callable:
    def values(data):
        rows = [r[field] for r in data["rows"] if r["objective"] == objective]
        return min(rows), max(rows)
    return values


def _invariance_spread(data) -> tuple[float, float]:
    stds = [row["std"] for row in data["gaussian"]]
    return min(stds), max(stds)


W, S, I, V, D, L = (f"experiments/{name}/results.json" for name in
                    ("weightings", "samplers", "invariance", "variance", "discrete", "likelihood"))
DEQ = "experiments/likelihood/dequantization.json"
README, MNIST, IDODE = "README.md", "vdm/configs/mnist.py", "vdm/configs/mnist_idode.py"
WREADME, SREADME, IREADME, VREADME, DREADME, LREADME = (f"experiments/{name}/README.md" for name in
                                                        ("weightings", "samplers", "invariance", "variance",
                                                         "discrete", "likelihood"))
QUALITY, NB01, NB02 = "vdm/quality.py", "notebooks/01_vdm_2d.ipynb", "notebooks/02_mnist_quickstart.ipynb"
PERF = "experiments/performance/README.md"
SC, SCREADME = "experiments/scoring/results.json", "experiments/scoring/README.md"

FIGURES = [
    # experiments/weightings: the demo's setting and the rows the README and the demo's config quote
    Figure(W, ("rows[name=sigmoid_8_3500_cosine].bpd", "rows[name=sigmoid_8_3500_cosine].bpd_se"), _pm, (
        (README, "| the same config in the weightings study | {} |"),
        (MNIST, "sigmoid, bias 8, 3,500 steps, cosine {}"),
        (WREADME, "**{} bits/dim at FD-MNIST"))),
    Figure(W, "rows[name=sigmoid_8_3500_cosine].bpd", "{:.2f}", (
        (README, "the sigmoid at bias 8 to {} bits/dim"),
        (README, "({*} and {} bits/dim above)"),
        (MNIST, "(another run of this config: the study's {} above)"),
        (WREADME, "sigmoid_8_3500_cosine ({}, "))),
    Figure(W, "rows[name=sigmoid_8_3500_cosine].fd_mnist", "{:.1f}", (
        (README, "the same config in the weightings study | {*} | {} of 128 samples |"),
        (MNIST, "sigmoid, bias 8, 3,500 steps, cosine {*} {} "),
        (WREADME, "bits/dim at FD-MNIST {}, with clean"))),
    Figure(W, ("rows[name=sigmoid_2].bpd", "rows[name=sigmoid_2].bpd_se"), _pm, (
        (README, "| the demo before this study (sigmoid, bias 2, 2,500 steps, constant) | {} |"),
        (MNIST, "sigmoid, bias 2, 2,500 steps {}"))),
    Figure(W, "rows[name=sigmoid_2].bpd", "{:.2f}", (
        (WREADME, "the old demo (bias 2, {} bits/dim"),
        (SREADME, "constant learning rate, {} bits/dim)"))),
    Figure(W, "rows[name=sigmoid_2].fd_mnist", "{:.1f}", (
        (README, "| clean digits; {} of 128 |"),
        (MNIST, "sigmoid, bias 2, 2,500 steps {*} {} "),
        (WREADME, "the old demo (bias 2, {*} bits/dim, FD {})"))),
    Figure(W, ("rows[name=elbo].bpd", "rows[name=elbo].bpd_se"), _pm, (
        (README, "| `--config.loss.weighting=elbo`, 2,500 steps, constant | {} |"),
        (MNIST, "elbo, 2,500 steps {}"))),
    Figure(W, "rows[name=elbo].fd_mnist", "{:.1f}", (
        (README, "strokes and blobs; {} of 128 |"),
        (MNIST, "elbo, 2,500 steps {*} {} "))),
    Figure(W, "rows[name=eps_mse_3500_cosine].bpd", "{:.2f}", (
        (README, "DDPM's eps-MSE to {} bits/dim"),
        (WREADME, "eps_mse {} at FD"))),
    Figure(W, "rows[name=eps_mse_3500_cosine].fd_mnist", "{:.1f}", (
        (README, "DDPM's eps-MSE to {*} bits/dim (FD-MNIST {})"),
        (WREADME, "eps_mse {*} at FD {}"))),
    Figure(W, _weightings_minutes, "{:.0f} to {:.0f}", (
        (README, "trains its own runs ({} minutes each as recorded)"),
        (WREADME, "every setting: {} minutes each as recorded"))),
    Figure(W, "reference.fd_mnist", "{:.1f}", (
        (WREADME, "the study's own draw, the last row of the table, {};"),)),
    # what real digits score on FD-MNIST: measured with vdm.quality (scripts/fd_mnist_real_digits.py)
    Figure(QUALITY, r"64 digits score (\d+ to \d+) \(median", "{}", (
        (README, "64 digits score {} (median"),
        (README, "random real digits: 64 score {}, 128"),
        (MNIST, "(64 random real digits score {})"))),
    Figure(QUALITY, r"128 score (\d+ to \d+) \(median", "{}", (
        (README, "128 score {} (median"),
        (README, "random real digits: 64 score {*}, 128 score {}) |"),
        (MNIST, "where 128 random real training digits score {}):"),
        (WREADME, "128 random real training digits score {} in ten draws"),
        (WREADME, "within FD-MNIST's noise of real digits ({})"))),
    Figure(QUALITY, r"128 score \d+ to \d+ \(median (\d+)\)", "{}", (
        (README, "128 score {*} (median {})"),
        (WREADME, "in ten draws (median {};"))),
    Figure(QUALITY, r"64 digits score \d+ to \d+ \(median (\d+)\)", "{}", (
        (README, "64 digits score {*} (median {})"),)),
    Figure(QUALITY, r"200 score (\d+ to \d+),", "{}", (
        (README, "200 score {},"),
        (SREADME, "200 random real training digits score {},"))),
    Figure(QUALITY, r"500 score ([\d.]+ to [\d.]+),", "{}", ((README, "500 score {},"),)),
    Figure(QUALITY, r"all 4,500 score ([\d.]+);", "{}", ((README, "all 4,500 score {};"),)),
    Figure(QUALITY, r"uniform noise scores about (\d+)", "{}", ((README, "uniform noise scores about {}."),)),
    # make demo, as measured: the demo's config states it (3,000 steps), and the 3,500-step checkpoint the studies
    # measured
    Figure(MNIST, r"fresh clone, 3,000 steps: [\d.]+ min in all, test (\d+\.\d+ \+- \d+\.\d+) bits/dim", "{}", (
        (README, "set-up included: {*} min in all | {} |"),
        (NB02, "cosine learning rate ({} bits/dim and mostly recognisable digits"))),
    Figure(MNIST, r"fresh clone, 3,000 steps: [^\n]*?FD-MNIST ([\d.]+) over its 64 samples", "{}", (
        (README, "some malformed; {} of the 64 samples it draws"),)),
    Figure(MNIST, r"fresh clone, 3,000 steps: ([\d.]+) min in all", "{}", ((README, "set-up included: {} min in all"),)),
    Figure(MNIST, r"fresh clone, 3,000 steps: ([\d.]+) min in all", lambda v: f"{round(float(v))}", (
        (NB02, "the demo model (`vdm.configs.mnist`, about {} minutes"),)),
    Figure(MNIST, r"3,500-step checkpoint: test (\d+\.\d+ \+- \d+\.\d+) bits/dim", "{}", (
        (README, "the machine otherwise idle | {} |"),
        (SREADME, "cosine learning rate: {} bits/dim on the 500 test digits"),
        (SREADME, "The VLB over all 500 test digits is {}."))),
    Figure(MNIST, r"3,500-step checkpoint: test (\d+\.\d+) \+- \d+\.\d+ bits/dim", "{}", (
        (README, "({} and {*} bits/dim\nabove)"),
        (IDODE, "(configs/mnist.py: {}); FD-MNIST"),
        (LREADME, "against the demo's {})"))),
    Figure(MNIST, r"3,500-step checkpoint: [^\n]*?FD-MNIST ([\d.]+) over its 64 samples", "{}", (
        (README, "a few malformed strokes; {} of the 64 samples it draws"),
        (IDODE, "over 64 samples (configs/mnist.py: {})"))),
    Figure(MNIST, r"3,500-step checkpoint: [^\n]*?([\d.]+) min in all", "{}", (
        (README, "(`--config.train.num_steps=3500`): {} min, the machine otherwise idle"),)),
    # configs/mnist_idode.py, as measured, and the dequantisation study on it
    Figure(IDODE, r"test (\d+\.\d+ \+- \d+\.\d+) bits/dim by the VLB", "{}", (
        (LREADME, "by the VLB over all 500 test digits {}, against"),)),
    Figure(IDODE, r"3,500 steps, ([\d.]+) min on a shared machine", "{}", (
        (LREADME, "trained for its 3,500 steps ({} min on a shared machine"),)),
    Figure(DEQ, "bounds[bound=ODE, truncated normal].bpd", "{:.2f}", (
        (IDODE, "the probability-flow ODE gives {} bits/dim with the truncated normal"),
        (LREADME, "bits/dim per image ({} against"),
        (LREADME, "looser than the VLB** ({} against"))),
    Figure(DEQ, "bounds[bound=ODE, uniform].bpd", "{:.2f}", (
        (IDODE, "with the truncated normal, {} with the uniform"),
        (LREADME, "bits/dim per image ({*} against {})"))),
    Figure(DEQ, "bounds[bound=VLB].bpd", "{:.2f}", ((LREADME, "looser than the VLB** ({*} against {} on the"),)),
    Figure(DEQ, ("truncated_minus_uniform", "truncated_minus_uniform_se"), lambda m, s: _pm(-m, s), (
        (LREADME, "the tighter bound**, by {}"),)),
    # experiments/samplers
    Figure(S, ("likelihoods[bound=ODE, uniform].bpd", "likelihoods[bound=ODE, uniform].se"), _pm, (
        (SREADME, "the probability-flow ODE gives {} bits/dim (uniform"),)),
    Figure(S, ("likelihoods[bound=ODE, truncated normal].bpd", "likelihoods[bound=ODE, truncated normal].se"), _pm, (
        (SREADME, "(uniform dequantisation) and {} (truncated normal"),)),
    Figure(S, ("likelihoods[bound=VLB].bpd", "likelihoods[bound=VLB].se"), _pm, ((SREADME, "The VLB gives {}:"),)),
    Figure(S, "likelihoods[bound=ODE, uniform].bpd", "{:.2f}", (
        (LREADME, "the truncated normal is the looser bound ({*} against {} bits/dim"),
        (LREADME, "it was the looser one ({*} against {})"))),
    Figure(S, "likelihoods[bound=ODE, truncated normal].bpd", "{:.2f}", (
        (LREADME, "the truncated normal is the looser bound ({} against"),
        (LREADME, "it was the looser one ({} against"))),
    Figure(S, "samples[sampler=ancestral,nfe=1000].fd_mnist", "{:.1f}", (
        (SREADME, "reaches the FD-MNIST of 1000 steps ({};"),)),
    Figure(S, "samples[sampler=ancestral,nfe=50].fd_mnist", "{:.1f}", ((SREADME, "at 50 evaluations ({})"),)),
    Figure(S, "samples[sampler=ancestral,nfe=10].fd_mnist", "{:.1f}", ((SREADME, "10 evaluations give {}."),)),
    Figure(S, "seconds", lambda s: f"{s / 60:.0f}", ((SREADME, "on 2 CPU cores ({} minutes in all)"),)),
    # experiments/invariance
    Figure(I, ("mnist[schedule=linear].minus_learned.mean", "mnist[schedule=linear].minus_learned.se",
               "mnist[schedule=cosine].minus_learned.mean", "mnist[schedule=cosine].minus_learned.se",
               "mnist[schedule=odd].minus_learned.mean", "mnist[schedule=odd].minus_learned.se"),
           "{:+.4f} +- {:.4f}, {:+.2f} +- {:.2f} and {:+.2f} +- {:.2f}", (
               (IREADME, "differ from the learned one by {} bits/dim"),)),
    Figure(I, ("mnist[schedule=learned].diffusion.mc_std", "mnist[schedule=linear].diffusion.mc_std",
               "mnist[schedule=odd].diffusion.mc_std",
               "mnist[schedule=cosine].diffusion.mc_std"),
           "{:.2f} (learned; linear: {:.2f}) through {:.1f} (odd) to {:.1f}", (
        (IREADME, "the Monte Carlo standard deviation of one draw ranges from {} bits/dim"),)),
    Figure(I, "gamma_0", "{:.2f}", ((IREADME, "The learned gamma_0 = {} lies"),)),
    Figure(I, lambda data: max(abs(g["mean"] - data["gaussian_exact_bpd"]) / g["se"] for g in data["gaussian"]), "{:.1f}",
           ((IREADME, "every schedule's estimate lies within {} SE of the closed form"),)),
    Figure(I, _invariance_spread, "{:.1f} to {:.1f}", ((IREADME, "the spread of one draw varies eight-fold ({})"),)),
    # experiments/variance
    Figure(V, ("rows[objective=VLB (elbo),estimator=learned schedule, iid].std_batch",
               "rows[objective=VLB (elbo),estimator=learned schedule, low-discrepancy].std_batch"),
           "{:.3f} to {:.3f}", ((VREADME, "cut the std of a 32-batch mean three-fold ({};"),)),
    Figure(V, ("rows[objective=VLB (elbo),estimator=learned schedule, iid].std_example",
               "rows[objective=VLB (elbo),estimator=importance sampling, adaptive p, iid].std_example"),
           "{:.2f} to {:.2f}", ((VREADME, "cuts the per-example std four-fold ({};"),)),
    Figure(V, ("small_rows[objective=schedule gradient off,estimator=own schedule, iid].std_example",
               "small_rows[objective=schedule gradient off,estimator=importance sampling, adaptive p, iid].std_example"),
           "{:.2f} to {:.2f}", ((VREADME, "far from the 4.6-fold lower std ({})"),)),
    Figure(V, "runs[run=schedule gradient on].max_from_linear", "{:.3f}", (
        (VREADME, "moved the schedule {} in log SNR away from linear"),)),
    Figure(V, lambda data: [f(at(data, f"runs[run=schedule gradient on].variance_vs_linear.{k}")) for k, f in
                            (("change", lambda c: -100 * c), ("se", lambda s: 100 * s))],
           "{:.1f}% +- {:.1f}%", ((VREADME, "lowered the per-example variance by {} on the same draws"),)),
    Figure(V, "max_from_linear", "{:.3f}", ((VREADME, "(linear to within {} in log SNR"),)),
    Figure(V, _variance_range("VLB (elbo)", "mean"), "{:.3f} to {:.3f}", ((VREADME, "(VLB diffusion term {}, SE"),)),
    Figure(V, _variance_range("VLB (elbo)", "se"), "{:.2f} to {:.2f}", ((VREADME, "diffusion term {*}, SE {} over"),)),
    Figure(V, _variance_range("trained loss (sigmoid)", "mean"), "{:.3f} to {:.3f}", ((VREADME, "trained loss {}, SE"),)),
    Figure(V, _variance_range("trained loss (sigmoid)", "se"), "{:.3f} to {:.3f}", ((VREADME, "trained loss {*}, SE {};"),)),
    # experiments/discrete
    Figure(D, ("rows[name=continuous].bpd.10.mean", "rows[name=continuous].bpd.100.mean",
               "rows[name=continuous].bpd.1000.mean", "rows[name=continuous].bpd.0.mean"),
           "{:.2f}, {:.2f}, {:.2f}, {:.2f}", ((DREADME, "for the continuous-time model {} bits/dim"),)),
    Figure(D, ("rows[name=T = 10].inf_minus_continuous.mean", "rows[name=T = 10].inf_minus_continuous.se",
               "rows[name=T = 100].inf_minus_continuous.mean", "rows[name=T = 100].inf_minus_continuous.se",
               "rows[name=T = 1000].inf_minus_continuous.mean", "rows[name=T = 1000].inf_minus_continuous.se"),
           "{:.2f} +- {:.2f}, {:.3f} +- {:.3f} and {:.3f} +- {:.3f}", (
               (DREADME, "worse than the continuous-time model by {} bits/dim"),)),
    Figure(D, ("rows[name=T = 10].bpd.10.mean", "rows[name=continuous].bpd.10.mean"), "L_10 ({:.2f}) is no lower than "
           "the continuous-time model's L_10 ({:.2f})", ((DREADME, "The T = 10 model's {}"),)),
    # experiments/likelihood
    Figure(L, ("variants[variant=importance_sampled].vlb.minus_baseline",
               "variants[variant=importance_sampled].vlb.minus_baseline_se"), lambda m, s: f"{m:.2f} +- {s:.2f}", (
        (LREADME, "gives the same VLB as the baseline ({})"),)),
    Figure(L, ("variants[variant=importance_sampled].ode_truncated.minus_baseline",
               "variants[variant=importance_sampled].ode_truncated.minus_baseline_se"), lambda m, s: _pm(-m, s), (
        (LREADME, "but an ODE bound {} bits/dim lower"),)),
    Figure(L, ("variants[variant=v_prediction].vlb.minus_baseline", "variants[variant=v_prediction].vlb.minus_baseline_se"),
           "{:+.3f} +- {:.3f}", ((LREADME, "**v-prediction alone changes nothing** ({})"),)),
    Figure(L, ("variants[variant=diffenc].vlb.minus_baseline", "variants[variant=diffenc].vlb.minus_baseline_se"),
           "{:+.3f} +- {:.3f}", ((LREADME, "**DiffEnc ties on the VLB** ({},"),)),
    Figure(L, ("variants[variant=diffenc].ode_truncated.minus_baseline",
               "variants[variant=diffenc].ode_truncated.minus_baseline_se"), lambda m, s: _pm(-m, s), (
        (LREADME, "**is {} lower on the ODE bound**"),)),
    Figure(L, ("variants[variant=diffenc_v_is].vlb.minus_baseline", "variants[variant=diffenc_v_is].vlb.minus_baseline_se"),
           "{:.3f} +- {:.3f}", ((LREADME, "the lowest VLB, {} against the baseline"),)),
    Figure(L, ("variants[variant=mulan].vlb.minus_baseline", "variants[variant=mulan].vlb.minus_baseline_se",
               "variants[variant=mulan].ode_truncated.minus_baseline",
               "variants[variant=mulan].ode_truncated.minus_baseline_se"),
           "{:.2f} +- {:.2f} on the VLB and {:.2f} +- {:.2f}", ((LREADME, "**MuLAN is worse at this budget**, by {} on"),)),
    Figure(L, lambda data: [next(v for v in data["variants"] if v["variant"] == name)["curve"][0][1]
                            for name in ("mulan", "vdm")],
           "{:.1f} at step 500 against {:.1f}", ((LREADME, "it starts far higher ({})"),)),
    Figure(L, "variants[variant=mulan].bpd_latent", "{:.3f}", ((LREADME, "the KL of the latent is only {} bits/dim"),)),
    Figure(L, "variants[variant=vdm].train_seconds", lambda s: f"{s / 60:.1f}", (
        (LREADME, "so its {} minutes is high"),)),
    # measured in one place, quoted in another
    Figure(PERF, r"\*\*([\d.]+) ms\*\* per optimizer step", "{}", ((README, "trains at {} ms per optimizer step"),)),
    Figure(PERF, r"about \*\*([\d,]+) images/s\*\*", "{}", ((README, "ms per optimizer step, about {} images/s"),)),
    Figure(PERF, r"this is roughly (\d+)% MFU", "{}", ((README, "images/s, roughly {}% of the bf16 peak"),)),
    Figure(README, r"`make test` from a fresh clone takes (\d+ min \d+ s)",
           lambda t: f"{int(t.split()[0]) + int(t.split()[2]) / 60:.1f}", (
               (README, "runs the test suite (CPU only; about {} minutes on 2 cores)"),)),
    Figure(NB01, r"Runs in under a minute on a 2-core CPU: (\d+ to \d+) s for its 3,000 training steps", "{}", (
        (README, "under a minute (measured: {} s for its 3,000 training steps;"),)),
    Figure(NB01, r"3,000 training steps, (\d+) s at the test budget", "{}", (
        (README, "s for its 3,000 training steps; {} s at the test budget)"),)),
    # experiments/scoring: the AUROCs of each set against the held-out digits
    Figure(SC, ("sets.noise.auroc", "sets.inverted.auroc", "sets.photos.auroc"), "{:.3f}, {:.3f}, {:.3f}", (
        (SCREADME, "almost perfectly (AUROC {})"),)),
    Figure(SC, "sets.noise.auroc", "{:.3f}", ((README, "by bits/dim are {} (noise)"),)),
    Figure(SC, "sets.inverted.auroc", "{:.3f}", ((README, "(noise), {}\n(inverted)"),)),
    Figure(SC, "sets.photos.auroc", "{:.3f}", ((README, "(inverted), {} (photographs)"),)),
    Figure(SC, "sets.mnist.auroc", "{:.3f}", ((README, "(photographs) and {} (MNIST digits"),
                                              (SCREADME, "are the hard\ncase ({})"))),
]


@functools.lru_cache(maxsize=None)
def text(path: str) -> str:
    """The words of ``path`` with whitespace collapsed: a notebook's markdown cells, any other file whole."""
    full = os.path.join(ROOT, path)
    if path.endswith(".ipynb"):
        with open(full) as f:
            raw = "\n".join("".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "markdown")
    else:
        with open(full) as f:
            raw = f.read()
    return re.sub(r"\s+", " ", raw)


def at(data, path: str):
    """``data`` at ``path``: dotted keys; ``name[field=value,...]`` picks the list element with those fields."""
    for part in re.findall(r"[^.\[]+(?:\[[^\]]*\])?", path):
        name, _, select = part.partition("[")
        if name:
            data = data[name]
        if select:
            wanted = dict(kv.split("=", 1) for kv in re.split(r",(?=[^,=]+=)", select.rstrip("]")))
            matches = [d for d in data if all(str(d.get(k)) == v for k, v in wanted.items())]
            assert len(matches) == 1, f"{path}: {len(matches)} elements match {wanted}"
            data = matches[0]
    return data


def expected(figure: Figure) -> str:
    """The figure as its source has it, at the precision its copies quote."""
    if figure.source.endswith(".json"):
        with open(os.path.join(ROOT, figure.source)) as f:
            data = json.load(f)
        if callable(figure.key):
            values = figure.key(data)
            values = values if isinstance(values, (list, tuple)) else [values]
        else:
            values = [at(data, k) for k in ((figure.key,) if isinstance(figure.key, str) else figure.key)]
    else:
        found = re.findall(figure.key, text(figure.source))
        assert len(found) == 1, f"{figure.source}: {len(found)} matches of the source pattern {figure.key!r}"
        values = [found[0]]
    return figure.fmt(*values) if callable(figure.fmt) else figure.fmt.format(*values)


def figure_pattern(figure: Figure) -> str:
    """What the figure looks like in a copy: the format with its numbers left open."""
    if callable(figure.fmt) or not figure.source.endswith(".json"):
        return FIGURE
    return "".join(NUM if part.startswith("{") else re.escape(part) for part in re.split(r"(\{[^}]*\})", figure.fmt))


def copy_pattern(figure: Figure, words: str) -> re.Pattern:
    parts = re.split(r"(\{\*?\})", re.sub(r"\s+", " ", words))
    assert parts.count("{}") == 1, f"{words!r}: one {{}} for the figure"
    return re.compile("".join(f"(?P<figure>{figure_pattern(figure)})" if p == "{}" else FIGURE if p == "{*}"
                              else re.escape(p) for p in parts))


def problems(figure: Figure, read: Callable[[str], str] = text) -> list[str]:
    """Every copy of ``figure`` that is missing or says another figure (empty: all agree)."""
    want, out = expected(figure), []
    for path, words in figure.copies:
        found = [m.group("figure") for m in copy_pattern(figure, words).finditer(read(path))]
        if not found:
            out.append(f"{path}: no {words!r} (the figure: {want})")
        out += [f"{path}: {words!r} says {got}, {figure.source} says {want}" for got in found if got != want]
    return out


IDS = [f"{f.source}:{f.key if isinstance(f.key, str) else getattr(f.key, '__name__', f.key)}"[:90] for f in FIGURES]


@pytest.mark.parametrize("figure", FIGURES, ids=IDS)
def test_every_copy_of_a_figure_quotes_its_source(figure):
    report = problems(figure)
    assert not report, "\n".join(report)


def _edited(path: str, words: str, figure: Figure) -> str:
    """``path``'s text with the figure after ``words`` changed in its last digit."""
    original = text(path)
    m = copy_pattern(figure, words).search(original)
    got = m.group("figure")
    digit = max(i for i, c in enumerate(got) if c.isdigit())
    changed = got[:digit] + str((int(got[digit]) + 1) % 10) + got[digit + 1:]
    return original[:m.start("figure")] + changed + original[m.end("figure"):]


def test_an_edited_copy_fails():
    """Each copy, with its figure changed in one digit, is reported (and only that copy)."""
    for figure in FIGURES:
        for path, words in figure.copies:
            edited = _edited(path, words, figure)
            report = problems(figure, lambda p: edited if p == path else text(p))
            assert report and all(r.startswith(f"{path}: {words!r}") for r in report), (figure, words, report)


def test_a_copy_whose_words_changed_is_reported():
    figure = FIGURES[0]
    path, words = figure.copies[0]
    report = problems(figure, lambda p: text(p).replace("weightings study", "weighting study") if p == path else text(p))
    assert report == [f"{path}: no {words!r} (the figure: {expected(figure)})"]


# ------------------------------------------------------------------------------------------------
# What the README names exists
# ------------------------------------------------------------------------------------------------

def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def test_every_path_the_readme_names_exists():
    paths = set(re.findall(r"(?<![\w/.<-])((?:vdm|scripts|tests|experiments|configs|notebooks)/[\w./-]*\w)", _readme()))
    assert len(paths) > 40
    assert [p for p in sorted(paths) if not os.path.exists(os.path.join(ROOT, p))] == []


def _known(field: str) -> bool:
    """A field of some shipped config, or a keyword argument under one of its ``*kwargs`` dicts (free names:
    the piece checks them itself, ``vdm.configlib.validate``)."""
    from vdm import configs

    for name in configs.CONFIGS:
        tree = configs.get(name).to_dict()
        for i, part in enumerate(field.split(".")):
            if not isinstance(tree, dict) or part not in tree:
                break
            if part.endswith("kwargs") and isinstance(tree[part], dict) and i < len(field.split(".")) - 1:
                return True
            tree = tree[part]
        else:
            return True
    return False


def test_every_config_field_the_docs_name_exists():
    from vdm import configs

    docs = _readme() + "".join(open(p).read() for p in configs.CONFIGS.values())
    named = set(re.findall(r"(?<![\w.])(?:--)?config\.((?:train|model|loss|eval|sample|data)\.[\w.]*\w)", docs))
    assert len(named) > 25
    assert [f for f in sorted(named) if not _known(f)] == []
    assert not _known("train.num_step") and not _known("model.schedule_kwarg.hidden")  # a check that can fail


def test_every_shipped_config_is_in_the_readme_table():
    from vdm import configs

    table = re.search(r"\| config \| data \| what it is \|\n((?:\|.*\n)+)", _readme()).group(1)
    listed = set(re.findall(r"`(\w+)`", "".join(line.split("|")[1] for line in table.splitlines())))
    assert sorted(set(configs.CONFIGS) - listed) == [] and sorted(listed - set(configs.CONFIGS)) == []


def test_the_studies_write_what_the_readme_says():
    """"Each study in experiments/ but performance is a script, run.py, that writes results.json, a plot and
    the tables of its README": every run.py writes results.json (``common.write_results``) and a plot; performance
    has no run.py and no results.json; every study with results is linked from the README."""
    readme = _readme()
    assert "Each study in `experiments/` but `performance` is a script, `run.py`, that writes `results.json`, a plot" \
        in readme
    scripts = glob.glob(os.path.join(ROOT, "experiments", "*", "run.py"))
    studies = sorted(os.path.basename(os.path.dirname(p)) for p in scripts)
    assert len(studies) >= 6
    for study in studies:
        with open(os.path.join(ROOT, "experiments", study, "run.py")) as f:
            source = f.read()
        assert "write_results" in source and "savefig" in source, study
    performance = os.path.join(ROOT, "experiments", "performance")
    assert not os.path.exists(os.path.join(performance, "run.py"))
    assert not glob.glob(os.path.join(performance, "*.json")) and not glob.glob(os.path.join(performance, "*.png"))
    for results in glob.glob(os.path.join(ROOT, "experiments", "*", "results.json")):
        study = os.path.basename(os.path.dirname(results))
        assert f"](experiments/{study}" in readme, study  # linked
