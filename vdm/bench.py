"""Benchmark: ``python -m vdm.bench --config configs/<name>.py [--config.x=...] [--workdir DIR]``.

Prints one table and writes the figures as JSON (``--json``, default ``DIR/bench.json`` or
``./bench.json``). What is measured, on the devices JAX sees:

* **compile**: wall time to lower and compile the train step (the persistent compilation
  cache is off, so this is a cold compile).
* **train step**: each call (``train.steps_per_call`` optimizer steps) timed to completion
  (``block_until_ready``) after two warm-up calls, on one batch already on the devices; the
  median and the 10th/90th percentiles per optimizer step. **images/s** comes from a second
  run of the same number of calls dispatched back to back (as training runs them), timed to
  the last one's completion.
* **FLOPs per image**: XLA's cost analysis of one optimizer step (forward, backward, optimizer
  and EMA update) divided by the batch, counted on the same model with its residual blocks
  unrolled and without rematerialisation, because XLA counts the body of a loop (``lax.scan``)
  once whatever its trip count. These are model FLOPs: recomputation by ``model.remat`` is
  not counted.
* **achieved TFLOP/s per device** = FLOPs per image x images/s / devices, and **MFU** =
  that / the device's peak dense TFLOP/s for the compute dtype (``PEAK_TFLOPS``; XLA runs
  float32 matmuls on NVIDIA tensor cores as TF32, so float32 is measured against the TF32
  peak), or ``--peak_tflops``. On a CPU there is no table entry: give ``--peak_tflops``.
* **peak memory**: the device's ``peak_bytes_in_use`` where the backend reports it (GPU,
  TPU), else the process's peak resident memory (CPU).
* **sampling**: images/s and network evaluations of each sampler (``--samplers``) at
  ``sample.steps`` with ``sample.num_images`` images, one compiled call after a warm-up.
* **evaluation**: test images/s of ``Trainer.evaluate`` (its second pass; the first compiles).
* **environment**: the jax, jaxlib, Flax, Optax and Orbax versions, Python, the operating system, the CPU's model
  and the device kind (``vdm.environment.environment``), beside the figures in the table and the JSON.
* **input pipeline**: images/s of the training batches alone (the grain pipeline's shuffled positions, one
  batched read of those records, put on the devices; there is no augmentation), which should be at least 10x
  the train throughput.
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import jax
from absl import app, flags
from flax import nnx

from vdm import (compilation, configlib, environment, main as cli, metrics, model as model_lib, paths,
                 samplers as samplers_lib, steps, train)

# Dense peak TFLOP/s per device by compute dtype (vendor data sheets; SXM parts for NVIDIA): rows of
# (device kind, then one peak per dtype of PEAK_DTYPES). Matched against jax.Device.device_kind, first match wins.
PEAK_DTYPES = ("bfloat16", "float32")
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.4, 494.7),
    ("H200", 989.4, 494.7),
    ("A100", 312.0, 156.0),
    ("L4", 121.0, 60.0),
    ("TPU v6 lite", 918.0, 918.0),
    ("TPU v5 lite", 197.0, 197.0),
    ("TPU v5", 459.0, 459.0),
    ("TPU v4", 275.0, 275.0),
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The dense peak of one device of ``device_kind`` at ``dtype`` (``PEAK_TFLOPS``), or None."""
    for name, *peaks in PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            return peaks[PEAK_DTYPES.index(dtype)]
    return None


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _flop_config(config):
    """The config whose one-step train program XLA can count: no loops over steps or blocks, no remat."""
    c = config.copy_and_resolve_references()
    c.train.steps_per_call = 1
    c.model.remat = False
    if "scan_blocks" in configlib.PIECES[1].accepted(c.model.network):
        c.model.network_kwargs.scan_blocks = False
    return c


def flops_per_image(config, info, mesh) -> float:
    """Model FLOPs of one optimizer step per training image (XLA's cost analysis, loops unrolled)."""
    c = _flop_config(config)
    compiled = compilation.compile_run(c, info, mesh)  # a cache of its own: nothing of the run is reused
    params = compiled.init(c.seed)
    state = jax.eval_shape(lambda: steps.initial_state(c.seed, params, compiled.tx, compiled.objective))
    batch = {"image": jax.ShapeDtypeStruct((1, c.train.batch_size) + tuple(info.shape), jax.numpy.int32)}
    if c.model.num_classes:
        batch["label"] = jax.ShapeDtypeStruct((1, c.train.batch_size), jax.numpy.int32)
    return program_flops(compiled.train_step.lower(state, batch)) * mesh.size / c.train.batch_size


def program_flops(lowered) -> float:
    """FLOPs of one device's program by XLA's cost analysis: of the lowered HLO where the backend
    counts it (CPU, TPU), else of the compiled program (XLA:GPU counts nothing before compiling:
    seen with jax 0.11.2 on an H200, 2026-12-04)."""
    def flops(cost):
        cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
        return None if not cost or "flops" not in cost else float(cost["flops"])
    counted = flops(lowered.cost_analysis())
    return counted if counted is not None else flops(lowered.compile().cost_analysis())


def peak_memory() -> tuple[int, str]:
    """(bytes, what): the devices' peak allocation where the backend reports it, else the host's peak RSS."""
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    if all("peak_bytes_in_use" in s for s in stats):
        return max(int(s["peak_bytes_in_use"]) for s in stats), "device peak_bytes_in_use (largest device)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS (the whole process)"


def _time_train(trainer, batch, calls: int) -> dict:
    began = time.perf_counter()
    compiled = trainer.train_step.lower(trainer.state, batch).compile()
    compile_s = time.perf_counter() - began
    state = trainer.state
    for _ in range(2):  # warm-up
        state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    per_call = []
    for _ in range(calls):
        began = time.perf_counter()
        state, logged = compiled(state, batch)
        jax.block_until_ready((state, logged))
        per_call.append(time.perf_counter() - began)
    began = time.perf_counter()
    for _ in range(calls):
        state, logged = compiled(state, batch)
    jax.block_until_ready((state, logged))
    dispatched = time.perf_counter() - began
    trainer.state = state
    k, batch_size = trainer.config.train.steps_per_call, trainer.config.train.batch_size
    step_ms = [1e3 * t / k for t in per_call]
    return {"compile_s": compile_s, "step_ms_median": statistics.median(step_ms),
            "step_ms_p10": _percentile(step_ms, 0.1), "step_ms_p90": _percentile(step_ms, 0.9),
            "calls_timed": calls, "images_per_s": calls * k * batch_size / dispatched}


def _time_samplers(trainer, names: list[str]) -> list[dict]:
    c, rows = trainer.config.sample, []
    labels = trainer.sample_labels()
    for name in names:
        kwargs = c.sampler_kwargs.to_dict() if name == c.sampler else {}
        fn = jax.jit(lambda p, r, name=name, kwargs=kwargs: model_lib.generate(
            nnx.merge(trainer.graphdef, p), r, c.num_images, num_steps=c.steps, sampler=name, labels=labels,
            guidance=c.guidance, sampler_kwargs=kwargs))
        key = jax.random.PRNGKey(0)
        jax.block_until_ready(fn(trainer.state.ema_params, key))  # compile
        began = time.perf_counter()
        samples = jax.block_until_ready(fn(trainer.state.ema_params, key))
        seconds = time.perf_counter() - began
        rows.append({"sampler": name, "num_steps": c.steps, "nfe": int(samples.nfe),
                     "images_per_s": c.num_images / seconds, "seconds": seconds})
    return rows


def _time_evaluation(trainer) -> float:
    trainer.evaluate()  # compile
    began = time.perf_counter()
    result = trainer.evaluate()
    return result["count"] / (time.perf_counter() - began)


def _time_input(trainer, min_batches: int = 20, min_seconds: float = 2.0) -> float:
    batches = trainer.train_batches(0)
    jax.block_until_ready(next(batches))  # starts the pipeline's workers
    began, count = time.perf_counter(), 0
    while count < min_batches or time.perf_counter() - began < min_seconds:
        jax.block_until_ready(next(batches))
        count += 1
        if count >= 10 * min_batches:
            break
    opt = trainer.config.train
    return count * opt.steps_per_call * opt.batch_size / (time.perf_counter() - began)


def run(config, workdir: str | None = None, *, calls: int = 20, samplers: list[str] | None = None,
        peak: float | None = None) -> dict:
    """Every figure of the benchmark for ``config`` (see the module docstring), as a dict."""
    config.train.compilation_cache_dir = ""  # a cold compile
    names = list(samplers_lib.SAMPLERS) if samplers is None else samplers
    for name in names:
        if name not in samplers_lib.SAMPLERS:
            raise configlib.ConfigError(f"--samplers: unknown sampler {name!r} (valid: {', '.join(samplers_lib.SAMPLERS)})")
    if calls < 1:
        raise configlib.ConfigError(f"--calls={calls}: must be at least 1")
    with tempfile.TemporaryDirectory() as scratch:
        trainer = train.Trainer(config, workdir or scratch, exclusive=True)
        try:
            device = jax.devices()[0]
            batch = trainer.train_batch(0)
            out = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
                   "backend": jax.default_backend(), "device_kind": device.device_kind,
                   "devices": jax.device_count(), "processes": jax.process_count(),
                   "batch_size": config.train.batch_size, "steps_per_call": config.train.steps_per_call,
                   "dtype": config.model.dtype, "remat": bool(config.model.remat),
                   "parameters": sum(int(x.size) for x in jax.tree_util.tree_leaves(trainer.state.params)),
                   "environment": environment.environment()}
            out |= _time_train(trainer, batch, calls)
            out["flops_per_image"] = flops_per_image(config, trainer.dataset.info, trainer.mesh)
            out["achieved_tflops_per_device"] = out["flops_per_image"] * out["images_per_s"] / out["devices"] / 1e12
            out["peak_tflops_per_device"] = peak if peak is not None else peak_tflops(device.device_kind, config.model.dtype)
            out["mfu"] = (out["achieved_tflops_per_device"] / out["peak_tflops_per_device"]
                          if out["peak_tflops_per_device"] else None)
            out["peak_memory_bytes"], out["peak_memory_kind"] = peak_memory()
            out["samplers"] = _time_samplers(trainer, names)
            out["eval_images_per_s"] = _time_evaluation(trainer)
            out["input_images_per_s"] = _time_input(trainer)
            out["input_over_train"] = out["input_images_per_s"] / out["images_per_s"]
        finally:
            trainer.close()
    return out


def table(r: dict) -> str:
    """The benchmark's figures as a two-column text table."""
    mfu = "-- (no peak known: pass --peak_tflops)" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% of {r['peak_tflops_per_device']:g}"
    rows = [
        ("device", f"{r['device_kind']} x {r['devices']} ({r['backend']}, {r['processes']} process(es)), jax {r['jax']}"),
        ("environment", environment.describe(r["environment"])),
        ("batch", f"{r['batch_size']} global, {r['steps_per_call']} step(s) per call, {r['dtype']}"
                  f"{', remat' if r['remat'] else ''}, {r['parameters']:,} parameters"),
        ("compile (train step)", f"{r['compile_s']:.1f} s"),
        ("train step", f"{r['step_ms_median']:.2f} ms median (p10 {r['step_ms_p10']:.2f}, p90 {r['step_ms_p90']:.2f};"
                       f" {r['calls_timed']} calls)"),
        ("train images/s", f"{r['images_per_s']:,.1f}"),
        ("model GFLOP per image", f"{r['flops_per_image'] / 1e9:.3f}"),
        ("achieved TFLOP/s per device", f"{r['achieved_tflops_per_device']:.3f}"),
        ("MFU", mfu),
        ("peak memory", f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']})"),
    ]
    rows += [(f"sampling: {s['sampler']}", f"{s['images_per_s']:,.1f} images/s ({s['nfe']} network evaluations)")
             for s in r["samplers"]]
    rows += [("evaluation images/s", f"{r['eval_images_per_s']:,.1f}"),
             ("input pipeline images/s", f"{r['input_images_per_s']:,.1f} ({r['input_over_train']:.1f}x train"
                                         f"{'' if r['input_over_train'] >= 10 else ': TOO SLOW, under 10x'})")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv: list[str] | None = None) -> None:
    cli.define_flags(flag_values, argv, mode=False, require_workdir=False)
    flags.DEFINE_integer("calls", 20, "Train-step calls timed (after two warm-up calls).", flag_values=flag_values)
    flags.DEFINE_list("samplers", None, "Samplers to time (default: all of vdm.samplers.SAMPLERS).",
                      flag_values=flag_values)
    flags.DEFINE_float("peak_tflops", None, "Peak dense TFLOP/s of one device, for the MFU (default: the "
                       "table in vdm.bench for known accelerators).", flag_values=flag_values)
    flags.DEFINE_string("json", None, "Where to write the figures (default DIR/bench.json, or ./bench.json).",
                        flag_values=flag_values)


def main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_logs()
    fv = flags.FLAGS
    try:
        config, workdir, _, notes = cli.resolve(fv)
        for note in notes:
            print(note, file=sys.stderr)
        result = run(config, workdir, calls=fv.calls, samplers=fv.samplers, peak=fv.peak_tflops)
    except cli.input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(result))
    path = fv.json or (paths.join(workdir, "bench.json") if workdir else os.path.abspath("bench.json"))
    paths.write_bytes(path, json.dumps(metrics.strict(result), indent=2, allow_nan=False).encode())
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    define_flags()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_or_exit)
