"""One optimizer step compiled in several variants, timed in alternating rounds.

    python experiments/performance/ab.py --config configs/mnist.py                      # custom vs plain conv gradients
    python experiments/performance/ab.py --config configs/mnist.py --variant conv=model.weight_gradient=conv \\
        --variant matmul=model.weight_gradient=matmul
    python experiments/performance/ab.py --config configs/mnist.py --variant base= \\
        --variant xnnpack=xla_cpu_use_xnnpack=true [--override model.network_kwargs.channels=64]
    python experiments/performance/ab.py --config mnist --tiny     # checks the script: common.TINY, one call

A variant is ``NAME=SPEC``; SPEC is a comma-separated list of
- XLA compile options ``xla_...=VALUE`` (fields of XLA's DebugOptions, passed to
  ``Compiled.compile(compiler_options=...)`` for this compile alone);
- config fields ``a.b=VALUE`` set for this variant only (e.g. ``model.network_kwargs.scan_blocks=false``),
  among them ``model.convolution_gradient=custom|plain|auto`` (whose derivatives the convolutions
  take, ``vdm.nets.kernels``' or XLA's own; ``auto`` is custom on the CPU only) and
  ``model.weight_gradient=conv|matmul|auto`` (the custom weight gradient's form).
An empty SPEC is the step as the trainer compiles it. ``--what jvp`` times the network's jvp in z
(forward mode, as the ODE likelihood's divergence takes it) instead of the optimizer step. Every
variant is compiled, then timed in alternating rounds (``--rounds`` of ``--calls`` calls each,
after one warm-up call per round), so that a shared machine's load falls on all alike. Prints
the compile time and the median per step of each, and the median of the per-round ratios to
the first variant (below 1: faster than it), and the environment as JSON (``vdm.environment``: versions, CPU
model, device kind). ``--tiny``: the config on ``common.TINY``'s network (before the
``--override`` s), one round of one call: checks the script, measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """``NAME=SPEC`` -> (name, compile options, config overrides)."""
    name, _, spec = text.partition("=")
    options, overrides = {}, {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: variant {name!r}: {item!r} is not KEY=VALUE")
        (options if key.startswith("xla_") else overrides)[key] = common.value(value)
    return name, options, overrides


def network_jvp(graphdef):
    """(params, batch) -> (eps_hat, its jvp in z along a Rademacher probe) at z = the batch's data, gamma = 0."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from vdm import diffusion

    def fn(params, batch):
        model = nnx.merge(graphdef, params)
        z = diffusion.encode(batch["image"][0], model.vocab_size)
        gamma, cond = jnp.zeros(z.shape[:1]), model.condition({k: v[0] for k, v in batch.items()})
        probe = jax.random.rademacher(jax.random.key(0), z.shape, z.dtype)
        return jax.jvp(lambda z: model.eps(z, gamma, cond), (z,), (probe,))

    return fn


def stepper(fn, state, batch):
    """A call of the compiled step ``fn`` that carries the state from call to call; returns the new state."""
    carried = [state]

    def call():
        carried[0], _ = fn(carried[0], batch)
        return carried[0]

    return call


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config file or shipped config name")
    parser.add_argument("--override", action="append", default=[],
                        help="FIELD=VALUE (JSON or Python literal, else a string), repeatable")
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME=SPEC, repeatable (default: custom=model.convolution_gradient=custom and "
                             "plain=model.convolution_gradient=plain)")
    parser.add_argument("--what", choices=("step", "jvp"), default="step",
                        help="step: one optimizer step; jvp: the network's jvp in z at one batch (the ODE "
                             "likelihood's divergence, forward mode)")
    parser.add_argument("--rounds", type=int, default=None, help="default 6; with --tiny 1")
    parser.add_argument("--calls", type=int, default=None, help="default 5; with --tiny 1")
    parser.add_argument("--tiny", action="store_true", help="common.TINY's network, one round of one call")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    args.rounds = args.rounds or (1 if args.tiny else 6)
    args.calls = args.calls or (1 if args.tiny else 5)
    variants = [parse_variant(v) for v in (args.variant or ["custom=model.convolution_gradient=custom",
                                                            "plain=model.convolution_gradient=plain"])]

    import jax
    import numpy as np

    from vdm import configlib, configs, data as data_lib, environment, objective as objective_lib, optimizer, steps

    base, _ = configlib.override(configs.get(args.config),
                                 (common.TINY if args.tiny else {}) | common.overrides(args.override))
    dataset = data_lib.load_dataset(base.data.source, **dict(base.data.kwargs))
    rows = data_lib.train_batch(dataset.train, base.train.batch_size, seed=0, step=0, process_index=0,
                                process_count=1)
    batch = {k: np.stack([v] * base.train.steps_per_call) for k, v in rows.items()}
    calls = {}
    for name, options, overrides in variants:
        config, _ = configlib.override(base, overrides)
        graphdef, init, decay_mask = steps.model_initializer(config, dataset.info)
        began = time.perf_counter()
        if args.what == "jvp":
            params = init(config.seed)
            fn = jax.jit(network_jvp(graphdef)).lower(params, batch).compile(compiler_options=options or None)
            calls[name] = lambda fn=fn, params=params: fn(params, batch)
        else:
            tx = optimizer.make_optimizer(config, decay_mask)
            objective = objective_lib.Objective.from_config(config)
            state = steps.initial_state(config.seed, init(config.seed), tx, objective)
            # a new function: JAX caches traces per function
            step = steps.make_train_step(graphdef, tx, objective, config.train.ema_decay)
            fn = jax.jit(step).lower(state, batch).compile(compiler_options=options or None)
            calls[name] = stepper(fn, state, batch)
        print(f"compile {name}: {time.perf_counter() - began:.1f} s", flush=True)
    times = {name: [] for name in calls}
    per_call = base.train.steps_per_call if args.what == "step" else 1
    for _ in range(args.rounds):
        for name, call in calls.items():
            jax.block_until_ready(call())
            began = time.perf_counter()
            for _ in range(args.calls):
                out = call()
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - began) / args.calls / per_call)
    first = variants[0][0]
    summary = {}
    for name in calls:
        ratio = statistics.median(a / b for a, b in zip(times[name], times[first]))
        summary[name] = {"median_s": statistics.median(times[name]), "ratio": ratio}
        print(f"{name}: median {1e3 * statistics.median(times[name]):.1f} ms per {args.what}; / {first}: {ratio:.3f}")
    print(f"({args.rounds} alternating rounds of {args.calls} calls; device {jax.devices()[0].device_kind})")
    print(f"environment: {json.dumps(environment.environment())}")
    return summary


if __name__ == "__main__":
    main()
