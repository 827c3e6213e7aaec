"""The train step of two (or more) commits of vdm, timed in alternating rounds on this machine.

    python experiments/performance/commits_ab.py --commits 3cd75ec HEAD --config mnist [--override F=V ...]
    python experiments/performance/commits_ab.py --commits HEAD --config mnist --tiny   # checks the script

Each commit is checked out (``git worktree add --detach``) under ``--scratch`` and imported from
there in a fresh process per round, which compiles one optimizer step of the config (from the
shared persistent compilation cache after the first round) and times ``--calls`` calls on one
batch already on the device, after two warm-up calls. Rounds alternate the commits, so a shared
machine's load falls on all alike. Prints, per commit, the median step time and user+system CPU
time per step, and the median of the per-round ratios to the first commit (below 1: faster), then the JSON record
of the run with its environment (``vdm.environment``: versions, CPU model, and the children's device kind).
An ``--override`` applies to every commit (fields the older commit lacks fail there). ``--repo``: another
clone's commits (default: the repository of this script). ``--tiny``: the config on ``common.TINY``'s network
(before the ``--override`` s), one round of one call: checks the script, measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402

# Run in the child: only APIs every measured commit has (Trainer-free, as vdm.bench's setup), from where each has them.
CHILD = r"""
import ast, json, os, resource, sys, time
import jax, numpy as np
from vdm import configlib, data as data_lib
try:
    from vdm import configs
    config = configs.get(sys.argv[1])
except ImportError:
    config = configlib.load_file(sys.argv[1])
overrides = json.loads(sys.argv[2])
config, _ = configlib.override(config, overrides)
dataset = data_lib.load_dataset(config.data.source, **dict(config.data.kwargs))
try:  # the objective in a module of its own
    from vdm import objective as objective_lib
except ImportError:  # older commits: in vdm.model
    from vdm import model as objective_lib
objective = objective_lib.Objective.from_config(config)
try:  # the trainer's pieces in modules of their own
    from vdm import optimizer, steps
    graphdef, init, decay_mask = steps.model_initializer(config, dataset.info)
    tx = optimizer.make_optimizer(config, decay_mask)
    state = steps.initial_state(config.seed, init(config.seed), tx, objective)
    train_step = steps.make_train_step(graphdef, tx, objective, config.train.ema_decay)
except ImportError:  # older commits: all of them in vdm.train
    from vdm import train
    graphdef, init, decay_mask = train.model_initializer(config, dataset.info)
    tx = train.make_optimizer(config, decay_mask)
    state = train.initial_state(config, init(config.seed), tx, objective)
    train_step = train.make_train_step(graphdef, tx, config)
rows = data_lib.train_batch(dataset.train, config.train.batch_size, seed=0, step=0, process_index=0, process_count=1)
batch = jax.device_put({k: np.stack([v] * config.train.steps_per_call) for k, v in rows.items()})
began = time.perf_counter()
step = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
compile_s = time.perf_counter() - began
for _ in range(2):
    state, _ = step(state, batch)
jax.block_until_ready(state)
calls = int(sys.argv[3])
cpu0, began = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(calls):
    state, _ = step(state, batch)
jax.block_until_ready(state)
wall, cpu1 = time.perf_counter() - began, resource.getrusage(resource.RUSAGE_SELF)
cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
per = calls * config.train.steps_per_call
print("RESULT " + json.dumps({"step_s": wall / per, "cpu_s": cpu / per, "compile_s": compile_s,
                             "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}))
"""


def _worktree(repo: str, commit: str, scratch: str) -> str:
    sha = subprocess.run(["git", "rev-parse", commit], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    path = os.path.join(scratch, sha[:12])
    if not os.path.isdir(path):
        subprocess.run(["git", "worktree", "add", "--detach", path, sha], cwd=repo, check=True, capture_output=True)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", nargs="+", required=True, help="git revisions; the first is the baseline")
    parser.add_argument("--config", required=True, help="a shipped config's name (or a file, for old commits)")
    parser.add_argument("--override", action="append", default=[], help="FIELD=VALUE (JSON value, or a string)")
    parser.add_argument("--rounds", type=int, default=None, help="default 5; with --tiny 1")
    parser.add_argument("--calls", type=int, default=None, help="default 10; with --tiny 1")
    parser.add_argument("--scratch", default=os.path.join(tempfile.gettempdir(), "vdm_commits_ab"))
    parser.add_argument("--repo", default=os.path.dirname(os.path.abspath(__file__)),
                        help="a directory in the git repository whose commits are measured (default: this one's)")
    parser.add_argument("--tiny", action="store_true", help="common.TINY's network, one round of one call")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.tiny else 5)
    args.calls = args.calls or (1 if args.tiny else 10)

    overrides = (common.TINY if args.tiny else {}) | common.overrides(args.override)
    repo = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=args.repo,
                          capture_output=True, text=True, check=True).stdout.strip()
    os.makedirs(args.scratch, exist_ok=True)
    trees = {c: _worktree(repo, c, args.scratch) for c in args.commits}
    results = {c: [] for c in args.commits}
    for r in range(args.rounds):
        for commit, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, "-c", CHILD, args.config, json.dumps(overrides), str(args.calls)],
                                 cwd=tree, env=env, capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"error: commit {commit} failed:\n{out.stderr[-2000:]}")
            results[commit].append(json.loads(line[0][7:]))
            print(f"round {r + 1} {commit}: {json.dumps(results[commit][-1])}", flush=True)
    base = results[args.commits[0]]
    summary = {}
    for commit, rows in results.items():
        summary[commit] = {
            "step_ms": 1e3 * statistics.median(x["step_s"] for x in rows),
            "cpu_ms": 1e3 * statistics.median(x["cpu_s"] for x in rows),
            "compile_s": statistics.median(x["compile_s"] for x in rows),
            "wall_ratio": statistics.median(x["step_s"] / b["step_s"] for x, b in zip(rows, base)),
            "cpu_ratio": statistics.median(x["cpu_s"] / b["cpu_s"] for x, b in zip(rows, base)),
        }
        s = summary[commit]
        print(f"{commit}: step {s['step_ms']:.1f} ms (CPU {s['cpu_ms']:.1f} ms), compile {s['compile_s']:.1f} s; "
              f"/ {args.commits[0]}: wall {s['wall_ratio']:.3f}, CPU {s['cpu_ratio']:.3f}")
    from vdm import environment  # this tree's, in this process: JAX's backends untouched (the children's devices)

    first = results[args.commits[0]][0]
    record = {"config": args.config, "overrides": overrides, "rounds": args.rounds, "calls": args.calls,
              "environment": environment.environment(device=False) | {k: first[k] for k in ("backend", "device_kind")},
              "summary": summary}
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
