"""Start-up time of a second run, with and without the persistent compilation cache.

    python scripts/startup_time.py --config configs/mnist.py --repeats 2

Runs ``python -m vdm.main`` for ``--num_steps`` steps into a fresh workdir each time, in three
settings, alternating so that a shared machine's load hits all of them alike:

- ``cold``: an empty cache directory (the first run of a config: compiles and fills the cache);
- ``off``: ``--config.train.compilation_cache_dir=''`` (every run compiles, as before the cache);
- ``warm``: the cache directory the cold run filled (a second run of the same config).

Then, in one Python process, two ``train.train_and_evaluate`` calls of the same config (the
notebook case), given one ``vdm.compilation.CompileCache``: the second reuses the compiled step, evaluation and
sampler of the first.
Prints wall seconds per setting (median over repeats) as JSON lines.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli_run(config: str, workdir: str, cache: str, num_steps: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vdm.main", "--config", config, "--workdir", workdir,
                    f"--config.train.num_steps={num_steps}", f"--config.train.compilation_cache_dir={cache}",
                    "--config.sample.num_images=16"], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - start


def notebook(config_path: str, tmp: str, num_steps: int) -> list[float]:
    code = f"""
import json, time
from vdm import compilation, configlib, train
config = configlib.load_file({config_path!r})
config.train.num_steps = {num_steps}
config.sample.num_images = 16
config.train.compilation_cache_dir = ""  # measure what the kernel keeps, not the disk cache
times, cache = [], compilation.CompileCache()  # the notebook's: one cache for both calls
for name in ("first", "second"):
    start = time.perf_counter()
    train.train_and_evaluate(config, {tmp!r} + "/nb_" + name, compile_cache=cache)
    times.append(time.perf_counter() - start)
print(json.dumps(times))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/mnist.py")
    parser.add_argument("--num_steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times = {"cold": [], "off": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            cache = os.path.join(tmp, f"cache{r}")
            times["cold"].append(cli_run(args.config, os.path.join(tmp, f"cold{r}"), cache, args.num_steps))
            times["off"].append(cli_run(args.config, os.path.join(tmp, f"off{r}"), "", args.num_steps))
            times["warm"].append(cli_run(args.config, os.path.join(tmp, f"warm{r}"), cache, args.num_steps))
        nb = [notebook(args.config, os.path.join(tmp, f"nb{r}"), args.num_steps) for r in range(args.repeats)]
    for name, values in times.items():
        print(json.dumps({"setting": f"cli {name}", "wall_s": round(statistics.median(values), 1),
                          "runs": [round(v, 1) for v in values]}))
    for i, name in enumerate(("first", "second")):
        values = [run[i] for run in nb]
        print(json.dumps({"setting": f"notebook {name} call", "wall_s": round(statistics.median(values), 1),
                          "runs": [round(v, 1) for v in values]}))


if __name__ == "__main__":
    main()
