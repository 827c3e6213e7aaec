"""Where one optimizer step spends its time: XLA's ops ranked by time, from a profiler trace.

    python experiments/performance/profile.py --config mnist [--override F=V ...] [--steps 3] [--top 25]
    python experiments/performance/profile.py --config mnist --tiny     # checks the script: common.TINY, 1 step

Compiles one optimizer step of the config (as ``vdm.train`` does, one step per call), runs it once,
then traces ``--steps`` calls with ``jax.profiler.trace`` and reads the trace back with
``jax.profiler.ProfileData``. Prints the time per step of each XLA op (summed over the threads
that ran it: on a CPU, XLA's worker threads), grouped by kind (the op name without its number:
``ynn_fusion`` = convolutions and matrix products handed to YNNPACK, ``wrapped_broadcast`` =
materialised broadcasts, ...), then the top ops with the shape and source of each, from the
compiled HLO, and the environment (``vdm.environment``: versions, CPU model, device kind). ``--hlo FILE`` keeps
the whole HLO text. ``--tiny``: the config on ``common.TINY``'s network (before the ``--override`` s), one traced
step: checks the script, measures nothing.
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a shipped config's name or a config file")
    parser.add_argument("--override", action="append", default=[], help="FIELD=VALUE (JSON value, or a string)")
    parser.add_argument("--steps", type=int, default=None, help="default 3; with --tiny 1")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hlo", default=None, help="write the compiled HLO text here")
    parser.add_argument("--tiny", action="store_true", help="common.TINY's network, one traced step")
    args = parser.parse_args(argv)
    args.steps = args.steps or (1 if args.tiny else 3)

    import jax
    import numpy as np

    from vdm import configlib, configs, data as data_lib, environment, objective as objective_lib, optimizer, steps

    config, _ = configlib.override(configs.get(args.config),
                                   (common.TINY if args.tiny else {}) | common.overrides(args.override))
    config.train.steps_per_call = 1
    dataset = data_lib.load_dataset(config.data.source, **dict(config.data.kwargs))
    graphdef, init, decay_mask = steps.model_initializer(config, dataset.info)
    tx = optimizer.make_optimizer(config, decay_mask)
    objective = objective_lib.Objective.from_config(config)
    state = steps.initial_state(config.seed, init(config.seed), tx, objective)
    rows = data_lib.train_batch(dataset.train, config.train.batch_size, seed=0, step=0, process_index=0,
                                process_count=1)
    batch = {k: np.stack([v]) for k, v in rows.items()}
    step = jax.jit(steps.make_train_step(graphdef, tx, objective, config.train.ema_decay)).lower(state, batch).compile()
    state, _ = step(state, batch)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(args.steps):
                state, _ = step(state, batch)
            jax.block_until_ready(state)
        profile = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    per_op: collections.Counter = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if line.name.startswith("python") or "XLAExecute" in line.name:
                continue  # the host's Python and the executor's waits, not ops
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "SlinkyThreadPool")):
                    per_op[event.name] += event.duration_ns / 1e6 / args.steps
    hlo = step.as_text()
    if args.hlo:
        with open(args.hlo, "w") as f:
            f.write(hlo)
    total = sum(per_op.values())
    kinds: collections.Counter = collections.Counter()
    for name, ms in per_op.items():
        kinds[re.sub(r"[._]\d+$", "", name)] += ms
    print(f"{config.model.network}, batch {config.train.batch_size}, {jax.devices()[0].device_kind}: "
          f"{total:.1f} ms of op time per step (all threads)")
    for kind, ms in kinds.most_common(args.top):
        print(f"  {ms:9.2f} ms  {100 * ms / total:5.1f}%  {kind}")
    print("top ops:")
    for name, ms in per_op.most_common(args.top):
        line = re.search(rf"%{re.escape(name)} = (\S+).*?op_name=\"([^\"]*)\"", hlo)
        shape, source = (line.group(1), line.group(2).split("/")[-1]) if line else ("", "")
        print(f"  {ms:9.2f} ms  {name:36s} {shape:28s} {source}")
    env = environment.environment()
    print(f"environment: {environment.describe(env)}")
    return {"ms_per_step": total, "kinds": dict(kinds), "ops": dict(per_op), "environment": env}


if __name__ == "__main__":
    main()
