"""Non-finite training steps: tracked on the device, checked on the host, reported in one line.

Each train step checks the values ``CHECKED`` (the VLB's terms, the loss, the schedule's
endpoints and the gradient norm) and records which are NaN or infinite as bits of an int32.
Such a step is never applied (``vdm.steps``); ``Health`` keeps the record without a host sync
per step, and ``check_health`` turns it into ``NonFiniteError`` when the run must stop
(``train.skip_nonfinite``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from vdm import objective

# The values of a step checked for NaN/inf, in the order of the bits of Health.*_terms: the objective's
# terms and diagnostics (whatever it names them), the loss and the gradient norm.
CHECKED = (*objective.TERMS, "loss", *objective.DIAGNOSTICS, "gradient norm")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or infinity; the message (one line) names the step and the values."""


@struct.dataclass
class Health:
    """Non-finite steps, tracked on the device so that nothing syncs per step (int32 scalars).

    A step whose checked values (``CHECKED``) are not all finite is never applied: params,
    optimizer state, EMA and density stay as they were. ``first_*``: the first such step of
    the run (-1: none) and which values; ``run_*``: the current streak of them.
    """

    first_step: jax.Array
    first_terms: jax.Array
    run_start: jax.Array
    run_terms: jax.Array
    run_length: jax.Array
    skipped: jax.Array

    @classmethod
    def initial(cls) -> "Health":
        def none():
            return jnp.full((), -1, jnp.int32)

        def zero():  # a buffer of its own for each field: the train step donates the state
            return jnp.zeros((), jnp.int32)

        return cls(first_step=none(), first_terms=zero(), run_start=none(), run_terms=zero(), run_length=zero(),
                   skipped=zero())

    def after(self, step: jax.Array, bad_terms: jax.Array) -> "Health":
        """The record after step ``step`` (1-based) whose non-finite values are the bits ``bad_terms``."""
        bad = bad_terms != 0
        new_run = bad & (self.run_length == 0)
        return Health(
            first_step=jnp.where(bad & (self.first_step < 0), step, self.first_step),
            first_terms=jnp.where(bad & (self.first_step < 0), bad_terms, self.first_terms),
            run_start=jnp.where(new_run, step, jnp.where(bad, self.run_start, -1)),
            run_terms=jnp.where(bad, jnp.where(new_run, 0, self.run_terms) | bad_terms, 0),
            run_length=jnp.where(bad, self.run_length + 1, 0),
            skipped=self.skipped + bad.astype(jnp.int32))


def describe_terms(bits: int) -> str:
    return ", ".join(name for i, name in enumerate(CHECKED) if bits >> i & 1)


def check_health(health: Health, skip_nonfinite: int, last_checkpoint: int | None) -> None:
    """Raise NonFiniteError when the run must stop (one host sync of six scalars).

    ``skip_nonfinite`` 0: at the first non-finite step; N > 0: after N of them in a row.
    """
    h = {k: int(v) for k, v in jax.device_get(dataclasses.asdict(health)).items()}
    if skip_nonfinite == 0 and h["first_step"] >= 0:
        where, terms, what = h["first_step"], h["first_terms"], "step"
    elif skip_nonfinite > 0 and h["run_length"] >= skip_nonfinite:
        where, terms, what = h["run_start"], h["run_terms"], f"{h['run_length']} steps in a row from step"
    else:
        return
    kept = f"the last checkpoint is step {last_checkpoint}" if last_checkpoint is not None else "no checkpoint was saved"
    hint = ("lower train.lr or set train.grad_clip, or skip such steps with train.skip_nonfinite=N" if not skip_nonfinite
            else "lower train.lr or set train.grad_clip")
    raise NonFiniteError(f"non-finite {describe_terms(terms)} at {what} {where}; nothing non-finite was saved "
                         f"({kept}): {hint}")
