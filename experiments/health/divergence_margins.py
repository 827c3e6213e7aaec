"""How far a healthy training run stays from the divergence tests' thresholds (vdm.health).

    python experiments/health/divergence_margins.py --config digits --steps 800
    python experiments/health/divergence_margins.py --config mnist --steps 800
    python experiments/health/divergence_margins.py --tiny      # the script's check: seconds, common.TINY

Trains ``--steps`` steps of a shipped config with the divergence tests off, keeps every step's loss
and gradient norm, and replays them through the same running statistics as ``vdm.health.Health``
(decay ``STATISTICS_DECAY``, bias-corrected, healthy steps only). Prints, after the warm-up, the
largest loss excess in mean absolute deviations and the largest gradient-norm ratio: the margins
under ``train.divergence_loss_deviations`` (default 30) and ``train.divergence_grad_ratio`` (1000).
Measured 2026-12-04 on a 2-core CPU, 800 steps: digits 0.55 and 1.96, mnist 0.80 and 1.95.
``--tiny``: ``TINY_STEPS`` steps of the config on ``common.TINY``'s network, the warm-up cut to ``TINY_WARMUP``
steps so that some steps are measured (a check of the script, not a measurement). Writes nothing; prints one line.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402
from vdm import health, train  # noqa: E402

TINY_STEPS, TINY_WARMUP = 6, 2


def margins(losses: list[float], grads: list[float], warmup: int) -> tuple[float, float]:
    """(largest (loss - mean) / deviation, largest grad / mean) over the steps after ``warmup`` (at least one, as
    ``vdm.health.Health.spikes`` has it: the statistics of no step are none)."""
    d, warmup = health.STATISTICS_DECAY, max(warmup, 1)
    mean = weight = deviation = grad_mean = 0.0
    worst_loss = worst_grad = float("-inf")
    for i, (loss, grad) in enumerate(zip(losses, grads)):
        if i >= warmup:
            worst_loss = max(worst_loss, (loss - mean / weight) / (deviation / weight))
            worst_grad = max(worst_grad, grad / (grad_mean / weight))
        excess = abs(loss - mean / weight) if i else 0.0
        mean, weight = d * mean + (1 - d) * loss, d * weight + (1 - d)
        deviation, grad_mean = d * deviation + (1 - d) * excess, d * grad_mean + (1 - d) * grad
    return worst_loss, worst_grad


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="digits")
    parser.add_argument("--steps", type=int, default=None, help=f"default 800; with --tiny {TINY_STEPS}")
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny network: checks the script")
    args = parser.parse_args(argv)
    args.steps = args.steps or (TINY_STEPS if args.tiny else 800)
    tiny = common.TINY | {"train.divergence_warmup": TINY_WARMUP} if args.tiny else {}
    config = train.resolve_config(args.config, tiny | {"train.num_steps": args.steps,
                                                       "train.divergence_loss_deviations": 0.0,
                                                       "train.divergence_grad_ratio": 0.0})
    losses, grads = [], []
    with tempfile.TemporaryDirectory(prefix="vdm-margins-") as scratch:
        trainer = train.Trainer(config, scratch)
        try:
            for step in range(args.steps):
                trainer.state, logged = trainer.train_step(trainer.state, trainer.train_batch(step))
                losses.append(float(logged["loss"]))
                grads.append(float(logged["grad_norm"]))
        finally:
            trainer.close()
    loss, grad = margins(losses, grads, config.train.divergence_warmup)
    print(f"{args.config}, {args.steps} steps: largest loss excess {loss:.2f} mean absolute deviations "
          f"(threshold {health.Limits().loss_deviations:g}); largest gradient-norm ratio {grad:.2f} "
          f"(threshold {health.Limits().grad_ratio:g})")
    return loss, grad


if __name__ == "__main__":
    main()
