"""One optimizer step compiled in several variants, timed in alternating rounds.

    python experiments/performance/ab.py --config configs/mnist.py                      # custom vs plain conv gradients
    python experiments/performance/ab.py --config configs/mnist.py --variant base= \\
        --variant xnnpack=xla_cpu_use_xnnpack=true [--override model.network_kwargs.channels=64]

A variant is ``NAME=SPEC``; SPEC is a comma-separated list of
- XLA compile options ``xla_...=VALUE`` (fields of XLA's DebugOptions, passed to
  ``Compiled.compile(compiler_options=...)`` for this compile alone);
- config fields ``a.b=VALUE`` set for this variant only (e.g. ``model.network_kwargs.scan_blocks=false``);
- ``conv=custom|plain|auto``: whose gradient ``vdm.nets.layers``' 3x3 convolutions take, the custom
  VJP or XLA's own (``convolution_gradient``; ``auto``, the default, is custom on the CPU only);
- ``wgrad=conv|matmul|auto``: the custom gradient's weight-gradient form (``weight_gradient_form``).
An empty SPEC is the step as the trainer compiles it. Every
variant is compiled, then timed in alternating rounds (``--rounds`` of ``--calls`` calls each,
after one warm-up call per round), so that a shared machine's load falls on all alike. Prints
the compile time and the median per step of each, and the median of the per-round ratios to
the first variant (below 1: faster than it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def parse_variant(text: str) -> tuple[str, str, str, dict, dict]:
    """``NAME=SPEC`` -> (name, convolution gradient, weight-gradient form, compile options, config overrides)."""
    name, _, spec = text.partition("=")
    conv, wgrad, options, overrides = "auto", "auto", {}, {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: variant {name!r}: {item!r} is not KEY=VALUE")
        if key == "conv":
            conv = value
        elif key == "wgrad":
            wgrad = value
        else:
            (options if key.startswith("xla_") else overrides)[key] = common.value(value)
    return name, conv, wgrad, options, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config file or shipped config name")
    parser.add_argument("--override", action="append", default=[], help="FIELD=VALUE (JSON or Python literal, else a string), repeatable")
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME=SPEC, repeatable (default: custom=conv=custom and plain=conv=plain)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in (args.variant or ["custom=conv=custom", "plain=conv=plain"])]

    import jax
    import numpy as np

    from vdm import configlib, configs, data as data_lib, objective as objective_lib, optimizer, steps
    from vdm.nets import layers

    base, _ = configlib.override(configs.get(args.config), common.overrides(args.override))
    dataset = data_lib.load_dataset(base.data.source, **dict(base.data.kwargs))
    rows = data_lib.train_batch(dataset.train, base.train.batch_size, seed=0, step=0, process_index=0,
                                process_count=1)
    batch = {k: np.stack([v] * base.train.steps_per_call) for k, v in rows.items()}
    compiled, states = {}, {}
    for name, conv, wgrad, options, overrides in variants:
        config, _ = configlib.override(base, overrides)
        graphdef, init, decay_mask = steps.model_initializer(config, dataset.info)
        tx = optimizer.make_optimizer(config, decay_mask)
        objective = objective_lib.Objective.from_config(config)
        states[name] = steps.initial_state(config.seed, init(config.seed), tx, objective)
        # a new function: JAX caches traces per function
        step = steps.make_train_step(graphdef, tx, objective, config.train.ema_decay)
        began = time.perf_counter()
        with layers.convolution_gradient(conv), layers.weight_gradient_form(wgrad):
            compiled[name] = jax.jit(step).lower(states[name], batch).compile(compiler_options=options or None)
        print(f"compile {name}: {time.perf_counter() - began:.1f} s", flush=True)
    times = {name: [] for name in compiled}
    per_call = base.train.steps_per_call
    for _ in range(args.rounds):
        for name, fn in compiled.items():
            s, _ = fn(states[name], batch)
            jax.block_until_ready(s)
            began = time.perf_counter()
            for _ in range(args.calls):
                s, _ = fn(s, batch)
            jax.block_until_ready(s)
            times[name].append((time.perf_counter() - began) / args.calls / per_call)
    first = variants[0][0]
    for name in compiled:
        ratio = statistics.median(a / b for a, b in zip(times[name], times[first]))
        print(f"{name}: median {1e3 * statistics.median(times[name]):.1f} ms per step; / {first}: {ratio:.3f}")
    print(f"({args.rounds} alternating rounds of {args.calls} calls; device {jax.devices()[0].device_kind})")


if __name__ == "__main__":
    main()
