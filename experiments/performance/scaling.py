"""Data-parallel scaling: train-step throughput on 1, 2, 4, 8 devices at a fixed global batch.

    python experiments/performance/scaling.py --config mnist [--devices 1 2 4 8] [--override F=V ...]
    python experiments/performance/scaling.py --config mnist --tiny     # checks the script: 1 device, 1 call

On a CPU the devices are XLA's fake host devices (``--xla_force_host_platform_device_count``),
which share the same cores: there is no speed-up to gain, and what the table shows is the cost of
sharding the step (per-device batches, the gradient all-reduce, the collectives' scheduling). On
a machine with NVIDIA GPUs, each count runs on the first N GPUs (of ``CUDA_VISIBLE_DEVICES`` where it is set), and counts
above the number present are skipped; on a TPU, fewer devices than the host has are taken with
the TPU's own controls (set them yourself).

Each count runs in a fresh process (``vdm.train.Trainer`` builds the mesh over every device it
sees), which times the compiled step as ``vdm.bench`` does; rounds alternate the counts, so a
shared machine's load falls on all alike. Prints images/s per count (median over rounds) and its
ratio to one device, and the JSON of the whole run (with the first child's ``vdm.environment.environment()``: versions,
CPU model, device kind). ``--tiny``: the config on ``common.TINY``'s network (before
the ``--override`` s), one device (unless ``--devices``), one round of one call: checks the script.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

CHILD = r"""
import json, sys, tempfile
import jax
from vdm import bench, configlib, configs, environment, train
config, _ = configlib.override(configs.get(sys.argv[1]), json.loads(sys.argv[2]))
config.train.compilation_cache_dir = ""
with tempfile.TemporaryDirectory() as scratch:
    trainer = train.Trainer(config, scratch, exclusive=True)
    try:
        result = bench._time_train(trainer, trainer.train_batch(0), int(sys.argv[3]))
    finally:
        trainer.close()
print("RESULT " + json.dumps(result | {"devices": jax.device_count(), "backend": jax.default_backend(),
                                     "device_kind": jax.devices()[0].device_kind,
                                     "environment": environment.environment()}))
"""


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a shipped config's name or a config file")
    parser.add_argument("--override", action="append", default=[], help="FIELD=VALUE (JSON value, or a string)")
    parser.add_argument("--devices", type=int, nargs="+", default=None, help="default 1 2 4 8; with --tiny 1")
    parser.add_argument("--rounds", type=int, default=None, help="default 3; with --tiny 1")
    parser.add_argument("--calls", type=int, default=None, help="default 10; with --tiny 1")
    parser.add_argument("--tiny", action="store_true", help="common.TINY's network, one device, one call")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    args.devices = args.devices or ([1] if args.tiny else [1, 2, 4, 8])
    args.rounds = args.rounds or (1 if args.tiny else 3)
    args.calls = args.calls or (1 if args.tiny else 10)

    overrides = (common.TINY if args.tiny else {}) | common.overrides(args.override)
    results = {n: [] for n in args.devices}
    for r in range(args.rounds):
        for n in [n for n in args.devices if n in results]:
            flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
            gpus = (os.environ.get("CUDA_VISIBLE_DEVICES") or ",".join(map(str, range(n)))).split(",")[:n]
            env = dict(os.environ, XLA_FLAGS=flags.strip(), CUDA_VISIBLE_DEVICES=",".join(gpus))
            out = subprocess.run([sys.executable, "-c", CHILD, args.config, json.dumps(overrides), str(args.calls)],
                                 env=env, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"error: {n} devices failed:\n{out.stderr[-2000:]}")
            result = json.loads(line[0][7:])
            if result["backend"] != "cpu" and result["devices"] != n:
                print(f"skipping {n} devices: {result['devices']} {result['backend']} devices present", flush=True)
                results.pop(n)
                continue
            results[n].append(result)
            print(f"round {r + 1}, {n} devices: {result['images_per_s']:.1f} images/s, step "
                  f"{result['step_ms_median']:.1f} ms, compile {result['compile_s']:.1f} s", flush=True)
    counts = [n for n in args.devices if results.get(n)]
    base = statistics.median(x["images_per_s"] for x in results[counts[0]])
    summary = {}
    for n in counts:
        rate = statistics.median(x["images_per_s"] for x in results[n])
        summary[n] = {"images_per_s": rate, "ratio": rate / base,
                      "step_ms": statistics.median(x["step_ms_median"] for x in results[n]),
                      "compile_s": statistics.median(x["compile_s"] for x in results[n])}
        print(f"{n} devices: {rate:.1f} images/s ({rate / base:.2f} x {counts[0]}), compile "
              f"{summary[n]['compile_s']:.1f} s")
    first = results[counts[0]][0]
    record = {"config": args.config, "overrides": overrides, "backend": first["backend"],
              "device_kind": first["device_kind"], "environment": first["environment"], "rounds": args.rounds,
              "calls": args.calls, "summary": summary}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
