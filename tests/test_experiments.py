"""Every script under experiments/ run end to end at its smallest budget (``--tiny``), in this process.

Each study is imported by path and its ``main`` called with an argument list, writing into a temporary
directory: its results.json must have the structure of the study's published record (the same keys and
record fields, so that a study and what it published cannot drift apart), hold only finite figures, come
with a valid PNG plot and the README's tables, and, where a tiny run can check a known truth, agree with it.
The studies that restore a trained model share one tiny model (``common.tiny_model``), trained by the first
of them, and the tiny runs that train a model of its config (``common.DEMO``: discrete's, likelihood's baseline,
weightings') share its compiled functions: compilation is most of a tiny run's time, so a tiny run has few configs.
All run on one worker (an xdist group): one process's compiled functions, parsed digits and FD-MNIST network.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import glob
import importlib.util
import io
import json
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, parse_command_line

pytestmark = pytest.mark.xdist_group("experiments")

EXPERIMENTS = os.path.join(ROOT, "experiments")
PNG = b"\x89PNG\r\n\x1a\n"
# Fields whose keys are data (config overrides, a sampler's options, ODE tolerances), not the record's structure.
FREE_FORM = {"overrides", "options", "ode"}
# The fields that name an element of a list of records: a tiny run's element is compared with the published one
# of the same name (a tiny run has fewer variants, settings or rows than the published study).
NAMES = ("variant", "name", "schedule", "sampler", "bound", "run", "estimator")
# Fields whose keys name a run or a setting (variance's small runs, discrete's evaluated T): a tiny run's keys are some of
# the published ones (it has fewer runs and settings), each value of the structure of the published value of that key.
NAMED_KEYS = {"per_t_small", "curves", "bpd"}


def script(path: str):
    """The module of ``experiments/<path>``, imported by path (once)."""
    name = "experiments_" + re.sub(r"\W", "_", path[:-3])
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(EXPERIMENTS, path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module", autouse=True)
def quick_fd_classifier():
    """FD-MNIST's feature network trained for one step of 4,096 digits, not eight epochs (3 s): a tiny study's figures
    mean nothing."""
    from vdm import quality

    net = functools.cache(lambda: quality.MnistFeatures.train(epochs=1, batch_size=4096))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quality.MnistFeatures, "_trained_once", classmethod(lambda cls: net()))
        yield


@pytest.fixture(scope="module", autouse=True)
def digits_parsed_once():
    """The embedded digits' CSV files parsed once for the module, not for each split of each Trainer (0.1 s for the
    28x28 digits, some 60 times): every read gets its own copy of the parsed table."""
    from vdm.data import embedded

    parsed = functools.cache(embedded._read_rows)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(embedded, "_read_rows", lambda *args, **kwargs: parsed(*args, **kwargs).copy())
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """One directory for the module: the shared tiny model (``model``) and each study's output."""
    return str(tmp_path_factory.mktemp("experiments"))


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return type(value).__name__


def _element(published: list, element):
    """The published record of ``element``'s name (see ``NAMES``), else the first."""
    if isinstance(element, dict):
        for key in NAMES:
            if key in element:
                same = [p for p in published if isinstance(p, dict) and p.get(key) == element[key]]
                if same:
                    return same[0]
    return published[0]


def assert_same_structure(ours, published, where: str = "record") -> None:
    """``ours`` has the structure of ``published``: the same keys at every level (but in ``FREE_FORM``
    fields, and some of them in ``NAMED_KEYS`` fields), the same kinds of values (a number for a number; None stands
    for any value)."""
    if ours is None or published is None:
        return
    if isinstance(published, dict):
        assert isinstance(ours, dict), f"{where}: {_kind(ours)}, published a dict"
        if where.rsplit(".", 1)[-1] in NAMED_KEYS:
            assert ours and set(ours) <= set(published), f"{where}: keys {sorted(ours)}, published {sorted(published)}"
        else:
            assert sorted(ours) == sorted(published), f"{where}: keys {sorted(ours)}, published {sorted(published)}"
        for key in ours:
            if key not in FREE_FORM:
                assert_same_structure(ours[key], published[key], f"{where}.{key}")
    elif isinstance(published, list):
        assert isinstance(ours, list), f"{where}: {_kind(ours)}, published a list"
        assert ours, f"{where}: empty, published {len(published)} elements"
        if published:
            for i, element in enumerate(ours):
                assert_same_structure(element, _element(published, element), f"{where}[{i}]")
    else:
        assert _kind(ours) == _kind(published), f"{where}: {_kind(ours)} {ours!r}, published {_kind(published)}"


def assert_finite(value, where: str = "record") -> None:
    if isinstance(value, dict):
        for key, v in value.items():
            assert_finite(v, f"{where}.{key}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            assert_finite(v, f"{where}[{i}]")
    elif isinstance(value, float):
        assert math.isfinite(value), f"{where} = {value}"


def check_study(returned: dict, out: str, published: str, plot: str, name: str = "results") -> dict:
    """The written record of a study in ``out``: ``returned`` as JSON, of the structure of the published
    ``experiments/<published>``, finite; the plot ``out/<plot>`` a PNG; the README's tables between markers."""
    with open(os.path.join(out, f"{name}.json")) as f:
        record = json.load(f)
    assert record == json.loads(json.dumps(returned))
    with open(os.path.join(EXPERIMENTS, published)) as f:
        assert_same_structure(record, json.load(f))
    assert_finite(record)
    if plot:
        assert_png(os.path.join(out, plot))
    with open(os.path.join(out, "README.md")) as f:
        readme = f.read()
    tables = readme.split(f"<!-- {name} -->\n", 1)[1].split(f"\n<!-- /{name} -->", 1)[0]
    assert "| --- |" in tables
    return record


def assert_png(path: str) -> None:
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == PNG, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) > 100 and np.isfinite(image).all() and image.std() > 0, path


def test_a_tiny_run_never_writes_the_published_record():
    """``--tiny`` never writes over the published record, whatever ``--out`` says."""
    common = script("common.py")

    class Args:
        tiny, out = True, os.path.join(EXPERIMENTS, "discrete")

    with pytest.raises(SystemExit, match="--tiny writes no published record"):
        common.output_dir(Args, os.path.join(EXPERIMENTS, "discrete"))


# ---------------------------------------------------------------------------------------------- the studies


@pytest.mark.slow
def test_invariance(work):
    out = os.path.join(work, "invariance")
    record = script("invariance/run.py").main(["--tiny", "--out", out, "--workdir", os.path.join(work, "model")])
    record = check_study(record, out, "invariance/results.json", "schedules.png")
    assert [r["schedule"] for r in record["mnist"]] == [r["schedule"] for r in record["gaussian"]] == ["learned", "odd"]
    assert record["images"] == 16 and record["draws"] == 2
    learned = record["mnist"][0]["minus_learned"]
    assert learned["mean"] == 0 and learned["se"] == 0  # paired with itself
    # The known truth: E[L_inf] of the Gaussian data in closed form, under every schedule with its endpoints.
    for g in record["gaussian"]:
        assert abs(g["mean"] - record["gaussian_exact_bpd"]) < 4 * g["se"], g  # the suite's tolerance


@pytest.mark.slow
def test_samplers(work):
    out = os.path.join(work, "samplers")
    record = script("samplers/run.py").main(["--tiny", "--out", out, "--workdir", os.path.join(work, "model")])
    record = check_study(record, out, "samplers/results.json", "samplers.png")
    assert [(r["sampler"], r["nfe"]) for r in record["samples"]] == [("ancestral", 2)]
    assert all(r["fd_mnist"] > 0 for r in record["samples"])
    assert [r["bound"] for r in record["likelihoods"]] == ["VLB", "ODE, uniform", "ODE, truncated normal"]
    assert [r["images"] for r in record["likelihoods"]] == [2, 2, 2]
    assert record["likelihoods"][0]["nfe_per_batch"] is None and record["likelihoods"][1]["nfe_per_batch"] > 0
    again = script("samplers/run.py").main(["--tiny", "--out", out, "--tables_only"])  # from results.json alone
    assert again == record


@pytest.mark.slow
def test_dequantization(work):
    out = os.path.join(work, "likelihood")
    record = script("likelihood/dequantization.py").main(
        ["--tiny", "--out", out, "--workdir", os.path.join(work, "model"), "--config", "configs/mnist.py"])
    record = check_study(record, out, "likelihood/dequantization.json", "", name="dequantization")
    assert [r["bound"] for r in record["bounds"]] == ["VLB", "ODE, uniform", "ODE, truncated normal"]
    assert all(r["images"] == 2 for r in record["bounds"])


@pytest.mark.slow
def test_variance(work):
    out = os.path.join(work, "variance")
    record = script("variance/run.py").main(["--tiny", "--out", out, "--workdir", os.path.join(work, "model")])
    record = check_study(record, out, "variance/results.json", "variance.png")
    assert record["images"] == 16 and record["num_draws"] == 2
    assert [(r["run"], r["step"]) for r in record["runs"]] == [("schedule gradient on", 2)]
    assert [r["estimator"] for r in record["small_rows"]] == ["own schedule, iid", "fixed linear schedule, iid"]
    # The tiny model is trained on the elbo (common.DEMO): the VLB's rows are the trained loss's.
    rows = {r["estimator"]: r for r in record["rows"]}
    assert {r["objective"] for r in record["rows"]} == {"VLB (elbo)"} and list(rows) == [
        "learned schedule, iid", "fixed linear schedule, iid", "importance sampling, p ~ w, iid",
        "importance sampling, adaptive p, iid"]
    # The known truth: the tiny model's schedule is the fixed linear one (common.TINY), so its "learned" schedule
    # and the line between its endpoints are one schedule: the same estimates on the same draws.
    assert record["max_from_linear"] == 0 and record["variance_vs_linear"] == {"change": 0.0, "se": 0.0}
    assert rows["learned schedule, iid"] | {"estimator": ""} == rows["fixed linear schedule, iid"] | {"estimator": ""}


@pytest.mark.slow
def test_discrete(work):
    out = os.path.join(work, "discrete")
    record = check_study(script("discrete/run.py").main(["--tiny", "--out", out]), out, "discrete/results.json",
                         "discrete.png")
    [continuous] = record["rows"]
    assert continuous["T"] == 0 and continuous["step"] == 2
    assert continuous["own_minus_continuous"] == continuous["inf_minus_continuous"] == {"mean": 0.0, "se": 0.0}
    # The known truth (VDM, Sec. 4): for a fixed model the T-step bound falls as T grows; here by far more than
    # its standard error (a model two steps from its initialisation).
    bpd = continuous["bpd"]
    assert list(bpd) == ["10", "0"] and bpd["10"]["mean"] - 3 * bpd["10"]["se"] > bpd["0"]["mean"], bpd


@pytest.mark.slow
def test_likelihood(work):
    out = os.path.join(work, "likelihood")
    study = script("likelihood/run.py")
    record = check_study(study.main(["--tiny", "--out", out]), out, "likelihood/results.json", "study.png")
    [vdm] = record["variants"]
    assert vdm["variant"] == "vdm" and [step for step, _, _ in vdm["curve"]] == [1, 2]  # an evaluation after each step
    for key in ("vlb", "ode_uniform", "ode_truncated"):
        assert vdm[key]["images"] == (16 if key == "vlb" else 2)
        assert vdm[key]["minus_baseline"] == 0.0  # the baseline paired with itself
    # A second call reads the variant back from its workdir (nothing trained or evaluated again): the same record.
    assert json.loads(json.dumps(study.main(["--tiny", "--out", out, "--only", "vdm"]))) == record


@pytest.mark.slow
def test_weightings(work):
    out = os.path.join(work, "weightings")
    study = script("weightings/run.py")
    record = check_study(study.main(["--tiny", "--out", out]), out, "weightings/results.json", "weightings.png")
    [row] = record["rows"]
    assert (row["name"], row["steps"], row["lr_schedule"], row["monotonic"]) == ("elbo", 2, "cosine", True)
    # Real digits are far closer to the test digits than samples of an untrained model.
    assert 0 < record["reference"]["fd_mnist"] < row["fd_mnist"]


@pytest.mark.slow
def test_scoring(work):
    """The scoring study: every set scored image by image; its AUROCs are scikit-learn's ROC AUC of the
    per-image figures it recorded (a second method: the ranks, not the pairs)."""
    from sklearn.metrics import roc_auc_score

    out = os.path.join(work, "scoring")
    record = check_study(script("scoring/run.py").main(["--tiny", "--out", out]), out, "scoring/results.json",
                         "scores.png")
    sets = record["sets"]
    assert list(sets) == ["digits", "noise", "inverted", "mnist", "photos"] and record["score_draws"] == 4
    assert all(len(s["bpd"]) == 16 for s in sets.values())
    digits = sets["digits"]["bpd"]
    for name, s in sets.items():
        if name != "digits":
            truth = roc_auc_score([0] * len(digits) + [1] * len(s["bpd"]), digits + s["bpd"])
            assert abs(s["auroc"] - truth) < 1e-12, name


def test_divergence_margins_replay_the_library_statistics():
    """``margins`` replays ``vdm.health.Health``'s running statistics: on a made-up run, its largest loss
    excess and gradient ratio after the warm-up are those of the library's record, step by step."""
    import jax
    import jax.numpy as jnp

    from vdm import health

    margins = script("health/divergence_margins.py").margins
    rng = np.random.default_rng(0)
    losses = list(5.0 + rng.normal(0, 0.1, 14))
    grads = list(1.0 + rng.uniform(0, 0.5, 14))
    losses[9], grads[12] = 6.5, 9.0  # a spike of each
    record, excess, ratio = health.Health.initial(), [], []
    after = jax.jit(health.Health.after)
    for i, (loss, grad) in enumerate(zip(losses, grads)):
        if i >= 3:
            w = float(record.weight)
            excess.append((loss - float(record.loss_mean) / w) / (float(record.loss_deviation) / w))
            ratio.append(grad / (float(record.grad_mean) / w))
        record = after(record, jnp.asarray(i + 1), jnp.asarray(0), jnp.asarray(loss, jnp.float32),
                       jnp.asarray(grad, jnp.float32))
    loss, grad = margins(losses, grads, 3)
    assert loss == pytest.approx(max(excess), rel=1e-4) and grad == pytest.approx(max(ratio), rel=1e-4)
    assert np.argmax(excess) == 6 and np.argmax(ratio) == 9  # the spikes


def test_divergence_margins_tiny(capsys):
    loss, grad = script("health/divergence_margins.py").main(["--tiny"])
    assert math.isfinite(loss) and 0 < grad < math.inf
    assert "6 steps: largest loss excess" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- performance


def test_ab(capsys):
    """The default variants (config overrides: the same program for an MLP, which has no convolutions), then the
    network's jvp with an XLA compile option."""
    ab = script("performance/ab.py")
    summary = ab.main(["--config", "mnist", "--tiny"])
    assert list(summary) == ["custom", "plain"] and summary["custom"]["ratio"] == 1.0
    assert all(s["median_s"] > 0 for s in summary.values())
    jvp = ab.main(["--config", "mnist", "--tiny", "--what", "jvp", "--variant", "exact=xla_cpu_enable_fast_math=false"])
    assert list(jvp) == ["exact"] and jvp["exact"]["ratio"] == 1.0
    assert "per jvp" in capsys.readouterr().out


def test_profile(capsys):
    result = script("performance/profile.py").main(["--config", "mnist", "--tiny", "--top", "3"])
    assert result["ms_per_step"] > 0 and result["kinds"] and sum(result["ops"].values()) == pytest.approx(
        result["ms_per_step"])
    assert "top ops:" in capsys.readouterr().out


def _children_in_process(monkeypatch, child: str, environments: list) -> None:
    """``subprocess.run([python, "-c", child, *args], env=...)`` runs ``child`` in this process instead (its output
    captured as the child's): the script's own code and its child's, without a new process importing JAX again.
    The environments the script gave its children are kept in ``environments``."""
    real = subprocess.run

    def run(args, **kwargs):
        if list(args[:2]) != [sys.executable, "-c"]:
            return real(args, **kwargs)
        assert args[2] == child
        environments.append(kwargs.get("env"))
        out, argv = io.StringIO(), sys.argv
        sys.argv = ["-c", *args[3:]]
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(child, "<child>", "exec"), {"__name__": "__main__"})
        finally:
            sys.argv = argv
        return subprocess.CompletedProcess(args, 0, out.getvalue(), "")

    monkeypatch.setattr(subprocess, "run", run)


def test_scaling(monkeypatch):
    scaling = script("performance/scaling.py")
    environments = []
    _children_in_process(monkeypatch, scaling.CHILD, environments)
    record = scaling.main(["--config", "mnist", "--tiny"])
    assert record["backend"] == "cpu" and list(record["summary"]) == [1]
    assert record["summary"][1]["ratio"] == 1.0 and record["summary"][1]["images_per_s"] > 0
    [env] = environments
    assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=1")


def test_commits_ab(tmp_path, monkeypatch):
    """The worktree of a commit of a repository (one of one file), its child's code run on this working tree."""
    repo = tmp_path / "repo"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "README").write_text("one\n")
    subprocess.run(git + ["add", "README"], cwd=repo, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "one"], cwd=repo, check=True)
    commits_ab = script("performance/commits_ab.py")
    environments = []
    _children_in_process(monkeypatch, commits_ab.CHILD, environments)
    record = commits_ab.main(["--repo", str(repo), "--commits", "HEAD", "--config", "mnist", "--tiny",
                              "--scratch", str(tmp_path / "scratch")])
    summary = record["summary"]["HEAD"]
    assert summary["wall_ratio"] == summary["cpu_ratio"] == 1.0 and summary["step_ms"] > 0
    [env] = environments
    [tree] = glob.glob(str(tmp_path / "scratch" / "*"))
    assert env["PYTHONPATH"] == tree and open(os.path.join(tree, "README")).read() == "one\n"


def test_fake_data_is_what_the_npz_source_reads(tmp_path):
    from vdm import data

    script("performance/fake_data.py").main([str(tmp_path), "--shape", "4", "4", "3", "--train", "6", "--test", "2"])
    dataset = data.load_dataset("npz", path=str(tmp_path))
    assert dataset.info.shape == (4, 4, 3) and (dataset.info.num_train, dataset.info.num_test) == (6, 2)


def _keys_read(source: str, names: tuple[str, ...]) -> set[str]:
    """The string keys ``source`` reads from the variables ``names`` (``r["key"]``, ``r.get("key")``)."""
    keys = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in names:
            if isinstance(node.slice, ast.Constant):
                keys.add(node.slice.value)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and isinstance(node.func.value, ast.Name) and node.func.value.id in names):
            keys.add(node.args[0].value)
    return keys


def _string_constants(source: str) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def test_gpu_summary_reads_what_bench_writes(tmp_path):
    """Every field gpu_summary.py reads is one vdm.bench writes; a benchmark record becomes one table row."""
    summary = script("performance/gpu_summary.py")
    with open(summary.__file__) as f:
        read = _keys_read(f.read(), ("r", "s"))
    with open(os.path.join(ROOT, "vdm", "bench.py")) as f:
        written = _string_constants(f.read())
    assert read and read <= written, read - written
    record = {key: 1.5 for key in read} | {"mfu": 0.25, "remat": False, "samplers": [
        {"sampler": "ancestral", "images_per_s": 12.0}], "date": "2026-01-01", "device_kind": "cpu", "dtype": "float32"}
    (tmp_path / "bench_a.json").write_text(json.dumps(record))
    (tmp_path / "bench_b.json").write_text(json.dumps(record | {"mfu": None}))
    text = summary.main(str(tmp_path))
    header, rule, a, b = text.strip().splitlines()
    assert header.count("|") == rule.count("|") == a.count("|") == b.count("|")
    assert a.startswith("| a | cpu x 1.5") and "25.0% of 1.5" in a and "ancestral 12.0" in a and "| -- |" in b
    assert open(tmp_path / "summary.md").read() == text


def test_gpu_script_runs_every_command_with_flags_its_program_takes(tmp_path, monkeypatch):
    """gpu.sh is valid bash; with ``PY=echo`` it runs through (each mode), and every command it would run names
    a script or module that exists, with flags that program's parser takes."""
    from vdm import bench

    monkeypatch.chdir(ROOT)  # the commands' paths are the repository's
    path = os.path.join(EXPERIMENTS, "performance", "gpu.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    for mode in ({}, {"QUICK": "1"}, {"SMALL": "1"}):
        out = tmp_path / ("-".join(mode) or "default")
        run = subprocess.run(["bash", path, str(out)], env=dict(os.environ, PY="echo", **mode), capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0 and not (out / "failed.txt").exists(), run.stdout + run.stderr
        lines = run.stdout.splitlines()
        measured = [shlex.split(line.split(": ", 1)[1])[1:] for line in lines  # "== NAME: echo ARGS"
                    if line.startswith("== ") and not re.match(r"== \S+: exit", line)]
        direct = [shlex.split(line) for line in lines  # the two commands it runs itself, not through run()
                  if line.startswith(("experiments/performance/fake_data.py", "experiments/performance/gpu_summary"))]
        assert len(measured) == 8 and len(direct) == 2, run.stdout
        for argv in measured + direct:
            if argv[0] == "-m":
                assert argv[1] == "vdm.bench"
                parse_command_line(argv[2:], define=bench.define_flags)  # raises on a flag or field not there
            else:
                script(os.path.relpath(argv[0], "experiments")).parser().parse_args(argv[1:])
