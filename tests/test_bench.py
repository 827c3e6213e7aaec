"""vdm.bench: every figure is produced, and the FLOP count is right (a closed form for an MLP); the environment
recorded beside the figures."""
import json
import platform

import pytest
from conftest import load_config

from vdm import bench, configlib, environment, parallel
from vdm import data as data_lib


def test_peak_table_finds_known_accelerators_and_not_the_cpu():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert bench.peak_tflops("NVIDIA H100 PCIe", "float32") == 378.0  # before the SXM entry
    assert bench.peak_tflops("TPU v5 lite", "bfloat16") == 197.0
    assert bench.peak_tflops("cpu", "float32") is None
    assert all(len(row) == 1 + len(bench.PEAK_DTYPES) for row in bench.PEAK_TFLOPS)


def _mlp_flops(depth: int, hidden: int = 256, batch: int = 4096) -> float:
    c = load_config("toy2d")
    c.model.network_kwargs.hidden, c.model.network_kwargs.depth = hidden, depth
    c.train.batch_size, c.train.steps_per_call = batch, 3
    info = data_lib.load_dataset(c.data.source, **dict(c.data.kwargs)).info
    return bench.flops_per_image(c, info, parallel.make_data_mesh())


def test_flops_per_image_of_an_mlp_block_match_the_closed_form():
    """A residual MLP block has three H x H matmuls (dense1, the conditioning projection, dense2):
    6 H^2 FLOPs forward per image, twice that backward, so each extra block adds 18 H^2 per
    trained image (elementwise work and the optimizer, shared over 4,096 images, add under 1%).
    The steps of a call run in a loop that XLA counts once: the count must not depend on them."""
    hidden = 256
    two, four = _mlp_flops(2, hidden), _mlp_flops(4, hidden)
    assert (four - two) / 2 == pytest.approx(18 * hidden**2, rel=0.02)


@pytest.mark.slow
def test_every_figure_is_produced(tmp_path):
    c = load_config("test")
    c.eval.num_examples = 32
    with pytest.raises(configlib.ConfigError, match="--samplers: unknown sampler 'euler'"):
        bench.run(c, samplers=["euler"])
    r = bench.run(c, str(tmp_path / "bench"), calls=3, samplers=["ancestral"], peak=1.0)
    assert r["backend"] == "cpu" and r["devices"] >= 1 and r["parameters"] > 1000 and r["calls_timed"] == 3
    assert r["compile_s"] > 0 and 0 < r["step_ms_p10"] <= r["step_ms_median"] <= r["step_ms_p90"]
    assert r["images_per_s"] > 0 and r["flops_per_image"] > 1e5
    assert r["achieved_tflops_per_device"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / r["devices"] / 1e12)
    assert r["mfu"] == pytest.approx(r["achieved_tflops_per_device"] / 1.0)
    assert r["peak_memory_bytes"] > 2**20 and "RSS" in r["peak_memory_kind"]
    [s] = r["samplers"]
    assert s["sampler"] == "ancestral" and s["nfe"] == c.sample.steps and s["images_per_s"] > 0
    assert r["eval_images_per_s"] > 0 and r["input_images_per_s"] > 0
    assert r["input_over_train"] == pytest.approx(r["input_images_per_s"] / r["images_per_s"])
    assert r["environment"]["jax"] == r["jax"] and r["environment"]["device_kind"] == r["device_kind"]
    text = bench.table(r)
    assert environment.describe(r["environment"]) in text
    for label in ("environment", "compile (train step)", "train images/s", "model GFLOP per image", "MFU", "peak memory",
                  "sampling: ancestral", "evaluation images/s", "input pipeline images/s"):
        assert label in text
    json.dumps(r, allow_nan=False)


def test_the_command_line_reports_bad_input_in_one_line():
    from conftest import run_python

    out = run_python(["-m", "vdm.bench", "--config", "configs/test.py", "--samplers", "ancestral,euler"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("error: --samplers: unknown sampler 'euler'")


def test_flops_are_counted_after_compiling_where_the_backend_counts_none_before():
    """XLA:GPU's lowered program has no cost analysis (jax 0.11.2, H200): the count comes from the
    compiled program, which on this CPU must agree with the lowered count of a plain matmul."""
    import jax
    import jax.numpy as jnp

    lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((64, 32)), jnp.ones((32, 16)))

    class CountsNothingBeforeCompiling:
        def cost_analysis(self):
            return None

        def compile(self):
            return lowered.compile()

    assert bench.program_flops(lowered) == 2 * 64 * 32 * 16
    assert bench.program_flops(CountsNothingBeforeCompiling()) == 2 * 64 * 32 * 16


def test_the_environment_names_the_versions_the_cpu_and_the_device():
    import flax
    import jax
    import jaxlib
    import optax

    env = environment.environment()
    assert (env["jax"], env["jaxlib"], env["flax"], env["optax"]) == (jax.__version__, jaxlib.__version__,
                                                                      flax.__version__, optax.__version__)
    assert env["orbax"] and env["python"] == platform.python_version() and env["platform"] == platform.platform()
    assert env["cpu_model"] == environment.cpu_model() and env["cpu_model"] != "unknown" and env["cpu_count"] >= 1
    assert (env["backend"], env["device_kind"], env["device_count"]) == (
        jax.default_backend(), jax.devices()[0].device_kind, jax.device_count())
    assert json.loads(json.dumps(env)) == env
    without = environment.environment(device=False)
    assert "device_kind" not in without and without.items() <= env.items()
    line = environment.describe(env)
    assert f"jax {jax.__version__} (jaxlib {jaxlib.__version__})" in line and env["cpu_model"] in line
    assert env["device_kind"] in line and "\n" not in line
    assert environment.version("surely-not-an-installed-distribution") is None


def test_the_cpu_model_is_read_from_cpuinfo_or_else_from_the_platform():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n\n" \
          "processor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
    assert environment.cpu_model(x86) == "AMD EPYC 7B13 64-Core Processor"
    arm = "processor\t: 0\nBogoMIPS\t: 48.00\nCPU part\t: 0xd0c\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4\n"
    assert environment.cpu_model(arm) == "Raspberry Pi 4"
    assert environment.cpu_model("model name\t:\n") == (platform.processor() or platform.machine() or "unknown")


def test_environment_without_the_device_leaves_jax_backends_alone():
    """A parent process whose children use the accelerator (experiments/performance's scripts) must not take it."""
    import jax
    from conftest import run_python

    out = run_python(["-c", "import json, jax; from jax._src import xla_bridge; from vdm import environment; "
                            "env = environment.environment(device=False); "
                            "print(json.dumps([xla_bridge.backends_are_initialized(), env['jax']]))"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, jax.__version__]
