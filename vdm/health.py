"""Unhealthy training steps: tracked on the device, checked on the host, reported in one line.

A step is unhealthy when one of the values ``CHECKED`` (the VLB's terms, the loss, the
schedule's endpoints and the gradient norm) is NaN or infinite, or when it has diverged
(``SPIKES``): its loss far above the running statistics of the healthy steps before it, or its
gradient norm far above their running mean (``Limits``, from ``config.train.divergence_*``).
Each is recorded as one bit of an int32. An unhealthy step is never applied (``vdm.steps``);
``Health`` keeps the record without a host sync per step, and ``check_health`` turns it into
``NonFiniteError`` when the run must stop (``train.skip_nonfinite``). Which checkpoints count as
healthy, and where a rerun resumes after a stop, is ``vdm.resume``'s.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from vdm import objective, options

# The values of a step checked for NaN/inf, in the order of the bits of Health.*_terms: the objective's
# terms and diagnostics (whatever it names them), the loss and the gradient norm.
CHECKED = (*objective.TERMS, "loss", *objective.DIAGNOSTICS, "gradient norm")
# The divergence tests, as the bits after CHECKED's.
SPIKES = ("loss far above its running mean", "gradient norm far above its running mean")

# The running statistics' decay per healthy step: they follow about the last 100 healthy steps.
STATISTICS_DECAY = 0.99


class Limits(NamedTuple):
    """When a finite step counts as diverged (``config.train.divergence_*``).

    ``warmup``: healthy steps of statistics before the tests apply; ``loss_deviations``: a loss more
    than this many mean absolute deviations above the running mean; ``grad_ratio``: a gradient norm
    more than this times its running mean. 0 turns a test off.
    """

    warmup: int = 100
    loss_deviations: float = 30.0
    grad_ratio: float = 1000.0

    FIELDS = ("divergence_warmup", "divergence_loss_deviations", "divergence_grad_ratio")  # config.train's

    @classmethod
    def from_config(cls, train_config) -> "Limits":
        return cls(*(train_config[name] for name in cls.FIELDS))


def check_limits(*, divergence_warmup, divergence_loss_deviations, divergence_grad_ratio) -> None:
    """The one check of ``Limits``' values (``vdm.options.OptionError``, named as the config's ``train`` fields)."""
    options.nonnegative_int("divergence_warmup", divergence_warmup)
    options.nonnegative("divergence_loss_deviations", divergence_loss_deviations)
    options.nonnegative("divergence_grad_ratio", divergence_grad_ratio)
    if 0 < divergence_grad_ratio <= 1:
        raise options.OptionError("divergence_grad_ratio", divergence_grad_ratio,
                                  "must be 0 (off) or above 1 (at 1 the running mean itself counts as diverged)")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinity, or diverged, or a sampler did; the message (one line) names the step
    and the values. The command line exits with code 3."""


@struct.dataclass
class Health:
    """Unhealthy steps, tracked on the device so that nothing syncs per step.

    A step whose checked values (``CHECKED``) are not all finite, or that diverged (``SPIKES``),
    is never applied: params, optimizer state, EMA and density stay as they were. ``first_*``: the
    first such step of the run (-1: none) and which tests it failed; ``run_*``: the current streak of
    them. ``loss_mean``, ``loss_deviation`` and ``grad_mean``: running means (``STATISTICS_DECAY``) of
    the healthy steps' loss, of its absolute deviation and of the gradient norm, each to be divided by
    ``weight`` (the decay's bias correction); ``healthy``: how many healthy steps they have seen.
    """

    first_step: jax.Array
    first_terms: jax.Array
    run_start: jax.Array
    run_terms: jax.Array
    run_length: jax.Array
    skipped: jax.Array
    healthy: jax.Array
    weight: jax.Array
    loss_mean: jax.Array
    loss_deviation: jax.Array
    grad_mean: jax.Array

    @classmethod
    def initial(cls) -> "Health":
        def none():
            return jnp.full((), -1, jnp.int32)

        def zero(dtype=jnp.int32):  # a buffer of its own for each field: the train step donates the state
            return jnp.zeros((), dtype)

        return cls(first_step=none(), first_terms=zero(), run_start=none(), run_terms=zero(), run_length=zero(),
                   skipped=zero(), healthy=zero(), weight=zero(jnp.float32), loss_mean=zero(jnp.float32),
                   loss_deviation=zero(jnp.float32), grad_mean=zero(jnp.float32))

    def spikes(self, loss: jax.Array, grad_norm: jax.Array, limits: Limits) -> jax.Array:
        """The ``SPIKES`` bits (shifted past ``CHECKED``'s) of a step with this loss and gradient norm."""
        ready = self.healthy >= max(limits.warmup, 1)
        weight = jnp.maximum(self.weight, 1e-30)
        mean, deviation, grad_mean = self.loss_mean / weight, self.loss_deviation / weight, self.grad_mean / weight
        loss_spike = limits.loss_deviations > 0 and ready & (loss > mean + limits.loss_deviations * deviation)
        grad_spike = limits.grad_ratio > 0 and ready & (grad_norm > limits.grad_ratio * grad_mean)
        return (jnp.where(loss_spike, 1, 0) << len(CHECKED) | jnp.where(grad_spike, 1, 0) << len(CHECKED) + 1
                ).astype(jnp.int32)

    def after(self, step: jax.Array, bad_terms: jax.Array, loss: jax.Array | float = 0.0,
              grad_norm: jax.Array | float = 0.0) -> "Health":
        """The record after step ``step`` (1-based) whose failed tests are the bits ``bad_terms``; a healthy
        step's ``loss`` and ``grad_norm`` enter the running statistics."""
        bad = bad_terms != 0
        new_run = bad & (self.run_length == 0)
        d = STATISTICS_DECAY
        mean = self.loss_mean / jnp.maximum(self.weight, 1e-30)

        def running(total, value):  # a healthy step moves the running sum; an unhealthy one leaves it
            return jnp.where(bad, total, d * total + (1 - d) * value)

        return Health(
            first_step=jnp.where(bad & (self.first_step < 0), step, self.first_step),
            first_terms=jnp.where(bad & (self.first_step < 0), bad_terms, self.first_terms),
            run_start=jnp.where(new_run, step, jnp.where(bad, self.run_start, -1)),
            run_terms=jnp.where(bad, jnp.where(new_run, 0, self.run_terms) | bad_terms, 0),
            run_length=jnp.where(bad, self.run_length + 1, 0),
            skipped=self.skipped + bad.astype(jnp.int32),
            healthy=self.healthy + (~bad).astype(jnp.int32),
            weight=running(self.weight, 1.0),
            loss_mean=running(self.loss_mean, loss),
            loss_deviation=running(self.loss_deviation, jnp.where(self.healthy > 0, jnp.abs(loss - mean), 0.0)),
            grad_mean=running(self.grad_mean, grad_norm))


def describe_terms(bits: int) -> str:
    """``non-finite prior, gradient norm`` / ``loss far above its running mean`` / both, joined by ``; ``."""
    non_finite = [name for i, name in enumerate(CHECKED) if bits >> i & 1]
    spikes = [name for i, name in enumerate(SPIKES) if bits >> (len(CHECKED) + i) & 1]
    return "; ".join(([f"non-finite {', '.join(non_finite)}"] if non_finite else []) + spikes)


def check_health(health: Health, skip_nonfinite: int, last_healthy: int | None) -> bool:
    """Raise NonFiniteError when the run must stop (one host sync of the record); else whether the newest
    step was healthy (``skip_nonfinite`` > 0 may let a run go on in a streak of skipped steps).

    ``skip_nonfinite`` 0: at the first unhealthy step; N > 0: after N of them in a row.
    ``last_healthy``: the newest checkpoint known to be healthy (where a rerun resumes), for the message.
    """
    h = {k: v.item() for k, v in jax.device_get(dataclasses.asdict(health)).items()}
    if skip_nonfinite == 0 and h["first_step"] >= 0:
        where, terms, what = h["first_step"], h["first_terms"], "step"
    elif skip_nonfinite > 0 and h["run_length"] >= skip_nonfinite:
        where, terms, what = h["run_start"], h["run_terms"], f"{h['run_length']} steps in a row from step"
    else:
        return h["run_length"] == 0
    kept = (f"a rerun resumes from step {last_healthy}, the last healthy checkpoint" if last_healthy is not None
            else "no checkpoint is known to be healthy: a rerun starts from step 0")
    spiked = terms >> len(CHECKED)
    hint = "lower train.lr or set train.grad_clip"
    if not skip_nonfinite:
        hint += ", or skip such steps with train.skip_nonfinite=N"
    if spiked:
        hint += " (a false alarm: raise or turn off train.divergence_loss_deviations / train.divergence_grad_ratio)"
    raise NonFiniteError(f"{describe_terms(terms)} at {what} {where}; no such step was applied or saved ({kept}): "
                         f"{hint}")
