"""The training system end to end: CLI, resume, data parallelism, multi-process, bad input."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from conftest import (ROOT, compile_count, config_names, free_port, load_config as _config, run_python as _run,
                      xla_flags)

from vdm import checkpoint, compilation, configlib, data, health, metrics, optimizer, resume, steps, train


@pytest.mark.slow
def test_cli_trains_evaluates_samples_and_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    base = ["-m", "vdm.main", "--config", "configs/test.py", "--workdir", workdir]
    first = _run(base + ["--config.train.num_steps=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "test bits/dim:" in first.stdout and os.path.exists(os.path.join(workdir, "samples_2.png"))
    with np.load(os.path.join(workdir, "samples_2.npz")) as saved:
        assert saved["images"].dtype == np.uint8 and saved["images"].shape == (16, 8, 8, 1)
        assert saved["images"].max() < 17 and "labels" not in saved  # 17 grey levels, unconditional
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert result["step"] == 2 and result["count"] == 100 and 0 < result["bpd"] < 20
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["train"]["num_steps"] == 2
    second = _run(base + ["--config.train.num_steps=4"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 2" in second.stdout + second.stderr
    rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [2, 4]  # logged at 2 in the first run, continued to 4 in the second
    last = [r for r in rows if "loss" in r][-1]
    for key in ("loss", "bpd", "bpd_prior", "bpd_reconstruction", "bpd_diffusion", "gamma_0", "gamma_1",
                "grad_norm", "steps_per_sec", "images_per_sec"):
        assert np.isfinite(last[key]), key
    assert last["gamma_0"] < last["gamma_1"]
    assert any("eval_bpd" in r for r in rows)
    assert checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 4
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    trained = open(os.path.join(workdir, "samples_4.npz"), "rb").read()
    sample = _run(base + ["--mode", "sample"])  # the same step again: a new name, the training run's kept
    assert sample.returncode == 0 and "samples_4_2.png" in sample.stdout, sample.stderr[-2000:]
    assert os.path.exists(os.path.join(workdir, "samples_4_2.npz"))
    assert open(os.path.join(workdir, "samples_4.npz"), "rb").read() == trained
    grids = [tag for tag in _tensorboard_tags(os.path.join(workdir, "tensorboard")) if tag == "samples"]
    assert len(grids) == 3  # the end of each training run (steps 2 and 4) and --mode sample


def _tensorboard_tags(directory):
    from tensorboardX.proto import event_pb2

    tags = []
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            raw = f.read()
        pos = 0
        while pos < len(raw):  # TFRecord framing: length, crc, payload, crc
            length = int.from_bytes(raw[pos:pos + 8], "little")
            event = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
            tags += [v.tag for v in event.summary.value if v.HasField("image")]
            pos += 16 + length
    return tags


def _params_after(config, workdir, num_steps):
    config.train.num_steps = num_steps
    train.train_and_evaluate(config, workdir)
    trainer = train.Trainer(config, workdir)
    trainer.restore_latest()
    return jax.device_get(trainer.state)


@pytest.mark.slow
def test_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    config = _config()
    config.train.eval_every = 100  # no mid-run eval
    config.eval.num_examples = 16
    config.sample.num_images = 1
    config.sample.steps = 1
    straight = _params_after(config, str(tmp_path / "straight"), 4)
    _params_after(config, str(tmp_path / "resumed"), 2)
    resumed = _params_after(config, str(tmp_path / "resumed"), 4)
    assert int(straight.step) == int(resumed.step) == 4
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys, jax, numpy as np
    sys.path.insert(0, "tests")
    from conftest import compile_count, load_config
    from vdm import train
    config = load_config("test")
    config.train.batch_size = 16
    if sys.argv[2:] == ["unet"]:  # its convolutions, sharded over the batch
        config.model.network, config.model.network_kwargs = "unet", {"channels": 8, "num_blocks": 1, "dropout": 0.1}
    trainer = train.Trainer(config, sys.argv[1])
    losses = []
    for step in range(3):
        trainer.state, metrics = trainer.train_step(trainer.state, trainer.train_batch(step))
        losses.append(float(metrics["loss"]))
    leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(jax.device_get(trainer.state.params))]
    print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(), "losses": losses,
                      "traces": compile_count(trainer.train_step),
                      "checksum": [float(np.sum(x)) for x in leaves],
                      "first": [float(x.ravel()[0]) for x in leaves]}))
""")


def _device_run(tmp_path, devices, name, extra_env=None, network="unet"):
    """DEVICE_SCRIPT on ``devices`` CPU devices: a small U-Net (its convolutions sharded), or configs/test.py's MLP."""
    env = {"XLA_FLAGS": xla_flags(f"--xla_force_host_platform_device_count={devices}")} | (extra_env or {})
    out = _run(["-c", DEVICE_SCRIPT, str(tmp_path / name), network], env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_one_device_and_eight_devices_take_the_same_steps_and_compile_once(tmp_path):
    one = _device_run(tmp_path, 1, "one")
    eight = _device_run(tmp_path, 8, "eight")
    assert (one["devices"], eight["devices"]) == (1, 8)
    assert one["traces"] == eight["traces"] == 1  # three steps, one compilation
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=1e-5)
    np.testing.assert_allclose(eight["checksum"], one["checksum"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(eight["first"], one["first"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_processes_train_together_and_agree(tmp_path):
    port = free_port()
    procs = []
    for i in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"),
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, "-c", DEVICE_SCRIPT, str(tmp_path / "shared"), "mlp"], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    assert [o["processes"] for o in outs] == [2, 2] and outs[0]["devices"] == 4
    assert outs[0]["losses"] == outs[1]["losses"]
    assert outs[0]["checksum"] == outs[1]["checksum"]
    # And they agree with one process holding all four devices.
    single = _device_run(tmp_path, 4, "single", network="mlp")
    np.testing.assert_allclose(outs[0]["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose(outs[0]["checksum"], single["checksum"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override,message", [
    ({"model.schedule": "quadratic"}, "config.model.schedule='quadratic': valid names:"),
    ({"model.gamma_min": 6.0}, "config.model.gamma_min=6.0: must be below gamma_max=5.0"),
    ({"loss.weighting": "sigmoid", "loss.timesteps": 10}, "discrete time"),
    ({"train.log_every": 3, "train.steps_per_call": 2}, "multiple of train.steps_per_call=2"),
    ({"sample.num_images": 0}, "config.sample.num_images=0: must be >= 1"),
    ({"eval.score_draws": 6}, "config.eval.score_draws=6: must be a positive multiple of 4"),
    ({"sample.guidance": 1e30}, "config.sample.guidance=1e+30: must be in [0, 100]"),
    ({"data.source": "mnist_idx", "data.kwargs": {"path": "/nonexistent/mnist"}}, "/nonexistent/mnist"),
])
def test_bad_config_fails_with_one_line_before_compiling(tmp_path, override, message):
    config = _config()
    for key, value in override.items():
        section, field = key.split(".")
        config[section][field] = value
    with pytest.raises((configlib.ConfigError, data.DataError)) as info:
        train.Trainer(config, str(tmp_path))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "checkpoints" / "0")


@pytest.mark.slow
def test_cli_reports_bad_input_as_one_line(tmp_path):
    out = _run(["-m", "vdm.main", "--config", "configs/test.py", "--workdir", str(tmp_path),
                "--config.train.batch_size=12"], env={"XLA_FLAGS": xla_flags("--xla_force_host_platform_device_count=8")})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == "error: train.batch_size=12 is not divisible by the 8 devices"
    typo = _run(["-m", "vdm.main", "--config", "configs/test.py", "--workdir", str(tmp_path),
                 "--config.train.num_step=3"])
    assert typo.returncode != 0 and "num_step" in typo.stderr
    # No checkpoint to read, or no images to score: the one error line is all of stderr (no absl lines of JAX's
    # backends before it).
    not_images = tmp_path / "images.npz"
    not_images.write_text("not an npz")
    for program, error in ((["-m", "vdm.main", "--mode", "eval"], "error: no checkpoint in"),
                           (["scripts/class_accuracy.py"], "error: no checkpoint in"),
                           (["-m", "vdm.main", "--mode", "score", "--images", str(not_images)],
                            f"error: {not_images}: not an .npz file (")):
        missing = _run(program + ["--config", "configs/digits_cond.py", "--workdir", str(tmp_path / "none")])
        lines = missing.stderr.strip().splitlines()
        assert missing.returncode == 2 and len(lines) == 1 and lines[0].startswith(error), lines


def test_an_evaluation_with_a_non_finite_figure_is_an_error_line_and_exit_code_3(tmp_path, capsys):
    """A checkpoint of diverged (NaN) parameters evaluates to NaN bits/dim: --mode eval says so in one
    error line and exits 3 (as a diverged training run), printing no figure."""
    from vdm import main

    config = _config()
    config.eval.num_examples = 16
    trainer, *_ = _one_step(config, str(tmp_path))
    trainer.state = trainer.state.replace(ema_params=jax.tree.map(lambda x: x * np.nan, trainer.state.ema_params))
    trainer.save()
    trainer.close()
    result = train.evaluate_checkpoint(config, str(tmp_path))
    assert np.isnan(result["bpd"])
    capsys.readouterr()
    assert main.report(result, config) == 3
    out = capsys.readouterr()
    assert out.out == "" and out.err.count("\n") == 1
    assert out.err.startswith("error: non-finite result at step 1 (bpd=nan, bpd_diffusion=nan, ") and "bpd_se=nan" in out.err
    assert main.report(result | {k: 1.0 for k in result if isinstance(result[k], float)}, config) == 0
    assert "test bits/dim: 1.0000 +- 1.0000" in capsys.readouterr().out
    # Sampling from it: the final z (z_0) are NaN, which the decoder would have drawn as black; an error instead.
    config.sample.num_images, config.sample.steps = 2, 2
    with pytest.raises(health.NonFiniteError) as info:
        train.sample_checkpoint(config, str(tmp_path))
    assert str(info.value) == ("non-finite samples at step 1: the sampler's final z (z_0) holds a NaN or infinity in 2 "
                               "of 2 images (nothing was written)")
    assert not [name for name in os.listdir(tmp_path) if name.startswith("samples_")]


def _unet(config):
    """The test config with a small U-Net in place of its MLP: for the tests about convolutions."""
    config.model.network = "unet"
    config.model.network_kwargs = {"channels": 8, "num_blocks": 2, "dropout": 0.1}
    return config


def _one_step(config, workdir):
    trainer = train.Trainer(config, workdir)
    before = jax.device_get(trainer.state)
    trainer.state, m = trainer.train_step(trainer.state, trainer.train_batch(0))
    return trainer, before, jax.device_get(trainer.state), {k: float(v) for k, v in m.items()}


def _leaf(tree, *path):
    for p in path:
        tree = tree[p]
    return np.asarray(tree)


@pytest.mark.parametrize("loss", [
    {},
    {"weighting": "sigmoid"},
    {"timesteps": 10},
    {"variance_schedule_grad": True},
    {"weighting": "edm_monotonic", "importance_sampling": "adaptive"},
])
def test_loss_settings_from_the_config_reach_the_train_step(tmp_path, loss):
    config = _config()
    config.model.schedule_kwargs.learn_endpoints = "importance_sampling" not in loss
    for key, value in loss.items():
        config.loss[key] = value
    trainer, before, after, m = _one_step(config, str(tmp_path))
    assert all(np.isfinite(v) for v in m.values())
    if loss.get("weighting", "elbo") == "elbo" and not loss.get("importance_sampling"):
        assert m["loss"] == pytest.approx(m["bpd"], rel=1e-6)  # training the VLB itself
    else:
        assert abs(m["loss"] - m["bpd"]) > 1e-3  # a weighted loss, with the VLB still reported
    # The schedule interior is trained with uniform t; importance sampling draws log-SNR
    # directly, so the interior gets no gradient at all (only the endpoints matter).
    moved = _leaf(after.params, "schedule", "w3") - _leaf(before.params, "schedule", "w3")
    if loss.get("importance_sampling") == "adaptive":
        assert np.all(moved == 0)
        assert np.any(np.asarray(after.density.ema) != np.asarray(before.density.ema))
    else:
        assert np.any(moved != 0)


@pytest.mark.parametrize("network", ["unet", "mlp"])
def test_weight_decay_spares_biases_norms_embeddings_and_the_schedule(network):
    config = _config()
    config.model.num_classes = 10
    if network == "unet":
        _unet(config)
    info = data.DatasetInfo(name="x", shape=(8, 8, 1), vocab_size=17, num_train=10, num_test=10, num_classes=10)
    _, params, mask = steps.build_model(config, info, 0)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flat and any(flat.values())
    assert any("label_embedding" in name for name in flat)
    for name, decayed in flat.items():
        assert decayed == ("['schedule']" not in name and ("kernel" in name)), name


@pytest.mark.parametrize("name", config_names())
def test_every_config_validates_and_builds_its_model(name):
    from flax import nnx

    from vdm.model import VDM

    config = _config(name)
    configlib.validate(config)
    shapes = {"cifar10": (32, 32, 3), "imagenet32": (32, 32, 3), "imagenet64": (64, 64, 3), "toy2d": (1, 1, 2),
              "digits": (8, 8, 1), "digits_cond": (8, 8, 1), "test": (8, 8, 1), "mnist": (28, 28, 1),
              "mnist_cond": (28, 28, 1), "mnist_idode": (28, 28, 1), "mnist_flow": (28, 28, 1),
              "mnist_mulan": (28, 28, 1), "mnist_diffenc": (28, 28, 1),
              "cifar10_idode": (32, 32, 3), "cifar10_mulan": (32, 32, 3), "cifar10_diffenc": (32, 32, 3),
              "mnist_idode_finetune": (28, 28, 1)}
    model = nnx.eval_shape(lambda: VDM.from_config(config, image_shape=shapes[name], vocab_size=256, rngs=nnx.Rngs(0)))
    num_params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    assert num_params > 1000
    if name == "cifar10":  # the paper's 32 blocks of 128 channels
        assert config.model.network_kwargs.num_blocks == 32 and config.model.network_kwargs.channels == 128
        assert 20e6 < num_params < 60e6


@pytest.mark.slow
def test_coordinator_problems_end_in_one_line(tmp_path):
    base = ["-m", "vdm.main", "--config", "configs/test.py", "--workdir", str(tmp_path),
            "--config.train.coordinator_timeout_s=3"]
    alone = _run(base, env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}", "JAX_NUM_PROCESSES": "2",
                            "JAX_PROCESS_ID": "1"}, timeout=120)
    lines = alone.stderr.strip().splitlines()
    assert alone.returncode == 2, alone.stderr[-2000:]
    assert lines[0].startswith("waiting up to 3 s for all processes at the JAX coordinator 127.0.0.1:")
    assert lines[-1].startswith("error: not every process reached the JAX coordinator") and "process 1 of 2" in lines[-1]
    no_ids = _run(base, env={"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{free_port()}"}, timeout=120)
    assert no_ids.returncode == 2
    last = no_ids.stderr.strip().splitlines()[-1]
    assert last.startswith("error: jax.distributed.initialize failed:") and "JAX_NUM_PROCESSES" in last


def test_runs_given_one_compile_cache_share_what_reads_the_same_fields_and_no_others(tmp_path):
    """Two runs given one CompileCache: the second, differing only in fields the train step does not read (the
    length of a run at a constant learning rate, the seed, the evaluation's size), takes the first's compiled train
    step, compiled once; a field it reads (loss.weighting) builds it again, and nothing else that does not read it.
    A Trainer given no cache shares nothing."""
    config = _config()
    config.train.num_steps = 2
    config.eval.num_examples = 16
    config.sample.num_images = 2
    config.sample.steps = 2
    assert config.train.lr_schedule == "constant"
    cache = compilation.CompileCache()
    train.train_and_evaluate(config, str(tmp_path / "a"), compile_cache=cache)
    first = train.Trainer(config, str(tmp_path / "a"), compile_cache=cache)
    first.close()
    config.train.num_steps, config.eval.num_examples, config.seed = 4, 32, 1  # no train step reads these
    train.train_and_evaluate(config, str(tmp_path / "b"), compile_cache=cache)
    second = train.Trainer(config, str(tmp_path / "b"), compile_cache=cache)
    second.close()
    assert second.train_step is first.train_step and compile_count(second.train_step) == 1
    assert second.sampling is first.sampling and second.graphdef is first.graphdef
    assert second.eval_step is not first.eval_step  # the eval step is given the whole eval section
    assert cache.builds["train_step"] == cache.builds["model"] == cache.builds["sampling"] == 1

    config.loss.weighting = "sigmoid"  # read by the objective, and so by the train step
    third = train.Trainer(config, str(tmp_path / "b"), compile_cache=cache)
    third.close()
    assert third.train_step is not first.train_step and cache.builds["train_step"] == 2
    assert third.eval_step is second.eval_step and third.sampling is first.sampling and cache.builds["model"] == 1
    third.state, _ = third.train_step(third.state, third.train_batch(0))
    assert compile_count(third.train_step) == 1 and compile_count(first.train_step) == 1
    alone = train.Trainer(config, str(tmp_path / "c"))
    alone.close()
    assert alone.train_step is not third.train_step and alone.compile_cache is not cache


def test_a_compile_cache_keys_each_part_on_exactly_what_its_builder_is_given():
    """Equal inputs give the one part built; a part given as an input counts by its key; a builder's config holds
    only the fields it reads (reading another fails); a learning rate without decay does not read the run's length."""
    cache, built = compilation.CompileCache(), []

    def build(*inputs):
        built.append(inputs)
        return len(built)

    config = _config()
    a = cache.part("a", build, compilation.optimizer_view(config), (1, 2.0), {"x": [1]})
    assert cache.part("a", build, compilation.optimizer_view(config), (1, 2.0), {"x": [1]}) is a and a.value == 1
    assert cache.part("a", build, compilation.optimizer_view(config), (1, 2), {"x": [1]}).value == 2  # 2 is not 2.0
    assert cache.part("b", build, a).value == 3 and built[-1] == (1,)  # given the part's value
    assert cache.part("b", build, a).value == 3 and cache.builds == {"a": 2, "b": 1} and len(cache) == 3
    with pytest.raises(TypeError, match="cannot be keyed on a function"):
        cache.part("c", build, build)
    view = compilation.optimizer_view(config)
    assert view.train.num_steps == 0 and not hasattr(view.train, "ema_decay") and set(view) == {"train"}
    config.train.num_steps = 7
    assert compilation.optimizer_view(config).train.num_steps == 0
    config.train.lr_schedule = "cosine"
    assert compilation.optimizer_view(config).train.num_steps == 7  # the decay's length is compiled in
    assert set(compilation.objective_view(config).model) == {"gamma_min", "gamma_max", "prediction", "mean_encoder"}
    config.train.num_steps = 2
    assert optimizer.learning_rate(compilation.optimizer_view(config))(1) == optimizer.learning_rate(config)(1)


@pytest.mark.slow
def test_persistent_compilation_cache_fills_and_start_up_block_is_printed(tmp_path):
    cache = tmp_path / "cache"
    out = _run(["-m", "vdm.main", "--config", "configs/test.py", "--workdir", str(tmp_path / "run"),
                "--config.train.num_steps=2", f"--config.train.compilation_cache_dir={cache}"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert cache.is_dir() and len(list(cache.iterdir())) >= 3  # init, train step, eval step, sampler
    text = out.stdout + out.stderr
    for needle in ("vdm: jax ", "process 0 of 1", "devices 1 local, 1 global", "mesh {'data': 1}",
                   "batch 16 global = 16 per process = 16 per device", "compute float32", "parameters",
                   f"workdir: {tmp_path / 'run'}"):
        assert needle in text, needle


def test_dtype_and_remat_reach_the_network():
    config = _config()
    config.model.dtype = "bfloat16"
    config.model.remat = True
    info = data.DatasetInfo(name="x", shape=(8, 8, 1), vocab_size=17, num_train=10, num_test=10)
    from flax import nnx

    from vdm.model import VDM
    model = nnx.eval_shape(lambda: VDM.from_config(config, image_shape=info.shape, vocab_size=17, rngs=nnx.Rngs(0)))
    assert model.network.dtype == np.dtype("bfloat16") and model.network.remat
    config.model.dtype = "float16"
    with pytest.raises(configlib.ConfigError, match="config.model.dtype='float16': valid names: float32, bfloat16"):
        configlib.validate(config)


def test_convolution_settings_reach_every_convolution_change_no_parameter_and_resume_old_checkpoints():
    from flax import nnx

    from vdm.model import VDM
    from vdm.nets.kernels import Convolutions

    config = _unet(_config())
    config.model.convolution_gradient, config.model.weight_gradient = "plain", "matmul"
    info = data.DatasetInfo(name="x", shape=(8, 8, 1), vocab_size=17, num_train=10, num_test=10)
    models = [nnx.eval_shape(lambda c=c: VDM.from_config(c, image_shape=info.shape, vocab_size=17, rngs=nnx.Rngs(0)))
              for c in (config, _unet(_config()))]
    convs = [node for _, node in nnx.iter_graph(models[0]) if isinstance(node, nnx.Conv)]
    assert convs and all(c.conv_general_dilated == Convolutions("plain", "matmul") for c in convs)
    shapes = [jax.tree.map(lambda x: (x.shape, x.dtype), nnx.to_pure_dict(nnx.state(m, nnx.Param))) for m in models]
    assert shapes[0] == shapes[1]
    # A checkpoint written before these fields existed (or with other values) resumes.
    old = {k: v for k, v in _unet(_config()).model.to_dict().items() if k not in ("convolution_gradient", "weight_gradient")}
    identity = {"name": "x"}
    assert resume._model_differences({"config": {"model": old}, "data": identity}, config.to_dict(), identity) == []
    for field, names in (("convolution_gradient", "auto, custom, plain"), ("weight_gradient", "auto, conv, matmul")):
        bad = _config()
        bad.model[field] = "fast"
        with pytest.raises(configlib.ConfigError, match=f"^config.model.{field}='fast': valid names: {names}$"):
            configlib.validate(bad)


def test_python_entry_point_takes_a_shipped_config_by_name_with_overrides(tmp_path, capsys):
    overrides = {"model.schedule": "cosine", "model.network_kwargs.hidden": 16,
                 "train.num_steps": 2, "eval.num_examples": 16, "sample.num_images": 2, "sample.steps": 2}
    result = train.train_and_evaluate("test", str(tmp_path), overrides=overrides)
    assert result["step"] == 2 and np.isfinite(result["bpd"]) and result["count"] == 16
    assert os.path.isfile(result["samples"]) and (tmp_path / "checkpoints" / "2").is_dir()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note: ")]
    assert notes == ["note: schedule 'cosine' does not take 'hidden'; dropped config.model.schedule_kwargs.hidden"]
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)["model"]
    assert saved["schedule"] == "cosine" and saved["schedule_kwargs"] == {}
    assert saved["network_kwargs"] == {"hidden": 16, "depth": 1, "dropout": 0.1}


def test_overrides_set_a_copy_and_drop_the_replaced_pieces_arguments():
    config = _config()
    new, notes = configlib.override(config, {"model.schedule": "cosine", "train.num_steps": 7})
    assert new.train.num_steps == 7 and dict(new.model.schedule_kwargs) == {}
    assert notes == ["note: schedule 'cosine' does not take 'hidden'; dropped config.model.schedule_kwargs.hidden"]
    assert config.train.num_steps == 4 and config.model.schedule == "monotone_net"  # the caller's config is untouched
    assert config.model.schedule_kwargs.hidden == 16


@pytest.mark.parametrize("overrides,message", [
    ({"train.num_step": 2}, "override train.num_step=2: config has no field 'train.num_step' "
                            "(did you mean 'train.num_steps'?)"),
    ({"trian.lr": 1e-3}, "override trian.lr=0.001: config has no field 'trian.lr' (did you mean 'train.lr'?)"),
    ({"train.num_steps": "two"}, "override train.num_steps='two': Could not override field 'num_steps'"),
    ({"model.schedule": "quadratic"}, "config.model.schedule='quadratic': valid names:"),
])
def test_bad_overrides_from_python_are_one_line_before_compiling(tmp_path, overrides, message):
    with pytest.raises(configlib.ConfigError) as info:
        train.train_and_evaluate("test", str(tmp_path), overrides=overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not (tmp_path / "checkpoints").exists()


def test_learning_rate_warms_up_then_stays_or_follows_a_cosine_to_zero():
    config = _config()
    config.train.lr, config.train.warmup_steps, config.train.num_steps = 1e-3, 10, 110
    constant = optimizer.learning_rate(config)
    np.testing.assert_allclose([constant(s) for s in (0, 4, 9, 50, 109)], [1e-4, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    config.train.lr_schedule = "cosine"
    cosine = optimizer.learning_rate(config)
    steps = np.array([0, 9, 30, 59, 100, 110])
    # Closed form: after the warm-up's last step (9), 0.5 (1 + cos(pi (s - 9) / 101)), 0 at num_steps.
    want = np.where(steps < 9, 1e-3 * (steps + 1) / 10, 0.5e-3 * (1 + np.cos(np.pi * (steps - 9) / 101)))
    np.testing.assert_allclose([cosine(int(s)) for s in steps], want, rtol=1e-5, atol=1e-12)
    config.train.lr_schedule = "linear"
    with pytest.raises(configlib.ConfigError, match="config.train.lr_schedule='linear': valid names: constant, cosine"):
        configlib.validate(config)
