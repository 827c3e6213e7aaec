"""The benchmark rows of a `gpu.sh` run in the README's table format: ``python gpu_summary.py OUT``.

Reads OUT/bench_*.json (written by ``vdm.bench --json``), writes OUT/summary.md and prints it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os

HEADER = ("| run | device | batch, dtype | compile | train step (median, p10-p90) | images/s | GFLOP/image "
          "| achieved TFLOP/s | MFU | peak memory | sampling | evaluation |")


def row(name: str, r: dict) -> str:
    mfu = "--" if r["mfu"] is None else f"{100 * r['mfu']:.1f}% of {r['peak_tflops_per_device']:g}"
    sampling = ", ".join(f"{s['sampler']} {s['images_per_s']:,.1f}" for s in r.get("samplers", [])) or "--"
    evaluation = f"{r['eval_images_per_s']:,.0f} images/s" if r.get("eval_images_per_s") else "--"
    return (f"| {name} | {r['device_kind']} x {r['devices']} ({r['date']}, jax {r['jax']}) "
            f"| {r['batch_size']}, {r['dtype']}{', remat' if r['remat'] else ''} | {r['compile_s']:.1f} s "
            f"| {r['step_ms_median']:.2f} ms ({r['step_ms_p10']:.2f}-{r['step_ms_p90']:.2f}) | {r['images_per_s']:,.0f} "
            f"| {r['flops_per_image'] / 1e9:.3g} | {r['achieved_tflops_per_device']:.3g} | {mfu} "
            f"| {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_kind']}) | {sampling} | {evaluation} |")


def main(out: str) -> str:
    lines = [HEADER, "| --- " * HEADER.count("|", 1) + "|"]
    for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
        with open(path) as f:
            lines.append(row(os.path.basename(path)[len("bench_"):-len(".json")], json.load(f)))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return text


def parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the directory of a gpu.sh run (its bench_*.json)")
    return parser


if __name__ == "__main__":
    print(main(parser().parse_args().out))
