"""The adaptive ODE solve, by diffrax (Kidger 2021): the one module that imports it.

``vdm.samplers.solve_ode`` imports this module when an ODE is first solved: diffrax (with equinox and
optimistix) takes 0.6 s of the 2.7 s that ``import vdm.train`` takes, and most runs (training, the
fixed-step samplers, the VLB) never solve an ODE.
"""
from __future__ import annotations

from typing import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp


class _HostProgress(diffrax.AbstractProgressMeter):
    """diffrax's progress meter that hands the fraction of the interval done to ``report`` on the host."""

    report: Callable = eqx.field(static=True)

    def init(self) -> None:
        return None

    def step(self, state, progress) -> None:
        jax.debug.callback(self.report, progress)
        return state

    def close(self, state) -> None:
        del state


def solve(vector_field: Callable, y0, t_start: jax.Array, t_end: jax.Array, *, rtol: float, atol: float,
          solver_class: str, max_steps: int, on_progress: Callable | None):
    """(y at t_end, network evaluations): see ``vdm.samplers.solve_ode``; ``solver_class`` names diffrax's class."""
    method = getattr(diffrax, solver_class)()
    meter = diffrax.NoProgressMeter() if on_progress is None else _HostProgress(on_progress)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: vector_field(t, y)), method, t0=t_start, t1=t_end,
        dt0=None, y0=y0, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, progress_meter=meter)
    y_end = jax.tree.map(lambda y: y[0], sol.ys)
    return y_end, (6 * sol.stats["num_steps"] + 1).astype(jnp.int32)
