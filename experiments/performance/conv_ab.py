"""The train step with vdm's custom-gradient convolution against plain ``lax.conv_general_dilated``.

    python experiments/performance/conv_ab.py --config configs/mnist.py [--override model.network_kwargs.channels=64]

``vdm.nets.layers.conv_general_dilated`` writes the two gradient convolutions of a 3x3
'SAME' convolution in the canonical NHWC/HWIO layout (a custom VJP); ``plain_convolutions()``
switches it off. Both variants of one optimizer step are compiled, then timed in alternating
rounds (``--rounds`` of ``--calls`` calls each, after one warm-up call per round), so that a
shared machine's load falls on both alike. Prints the median per step of each and the median
of the per-round ratios custom / plain (below 1: the custom gradient is faster).
"""
from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a config file or shipped config name")
    parser.add_argument("--override", action="append", default=[], help="FIELD=VALUE (Python literal), repeatable")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()

    import ast

    import jax
    import numpy as np

    from vdm import configlib, data as data_lib, model as model_lib, train
    from vdm.nets import layers

    config = configlib.load_file(args.config)
    config, _ = configlib.override(config, {k: ast.literal_eval(v) if v[:1] in "0123456789-([{'\"TF" else v
                                            for k, v in (o.split("=", 1) for o in args.override)})
    dataset = data_lib.load_dataset(config.data.source, **dict(config.data.kwargs))
    graphdef, init, decay_mask = train.model_initializer(config, dataset.info)
    tx = train.make_optimizer(config, decay_mask)
    state = train.initial_state(config, init(config.seed), tx, model_lib.Objective.from_config(config))
    rows = data_lib.train_batch(dataset.train, config.train.batch_size, seed=0, step=0, process_index=0,
                                process_count=1)
    batch = {k: np.stack([v]) for k, v in rows.items()}
    compiled = {}
    for plain in (False, True):
        step = train.make_train_step(graphdef, tx, config)  # a new function: JAX caches traces per function
        began = time.perf_counter()
        if plain:
            with layers.plain_convolutions():
                compiled[plain] = jax.jit(step).lower(state, batch).compile()
        else:
            compiled[plain] = jax.jit(step).lower(state, batch).compile()
        print(f"compile {'plain' if plain else 'custom'}: {time.perf_counter() - began:.1f} s")
    times = {False: [], True: []}
    for _ in range(args.rounds):
        for plain in (False, True):
            s, _ = compiled[plain](state, batch)
            jax.block_until_ready(s)
            began = time.perf_counter()
            for _ in range(args.calls):
                s, _ = compiled[plain](s, batch)
            jax.block_until_ready(s)
            times[plain].append((time.perf_counter() - began) / args.calls)
    for plain in (False, True):
        print(f"{'plain' if plain else 'custom'}: median {1e3 * statistics.median(times[plain]):.1f} ms per step")
    ratio = statistics.median(a / b for a, b in zip(times[False], times[True]))
    print(f"custom / plain: {ratio:.3f} (median of {args.rounds} alternating rounds; device {jax.devices()[0].device_kind})")


if __name__ == "__main__":
    main()
