"""The probability-flow ODE: its drift over t, its adaptive solve (``SOLVERS``), and the ``ode`` sampler.

The probability-flow ODE (Song et al. 2021) of the variance-preserving process of ``vdm.diffusion``
(alpha_t^2 = sigmoid(-gamma_t), sigma_t^2 = sigmoid(gamma_t)), over t and per element i, is

    dz_i / dt = gamma_i'(t) (sigma_i eps_hat_i(z, gamma_t) - sigma_i^2 z_i) / 2      (PF-ODE)

(with a scalar gamma, gamma itself could be the time variable; over t, one schedule per element
works too, and gamma'(t) comes from ``jax.jvp`` of the schedule as in the loss). ``vdm.likelihood``
integrates it forwards for the log-density; :func:`ode` (registered in ``vdm.samplers`` as ``"ode"``)
backwards from z_1 to z_0. The adaptive solvers are ``SOLVERS`` (name -> diffrax solver class name;
``vdm.ode_solver`` runs them; a new one is ``SOLVERS.register(name, "<diffrax class name>")``).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp

from vdm import diffusion, registry
from vdm.sampler_plan import Plan

# name (the ``solver`` option) -> the diffrax solver class's name
SOLVERS: registry.Registry[str] = registry.Registry("ODE solver")
SOLVERS.register("tsit5", "Tsit5", module=__name__)
SOLVERS.register("dopri5", "Dopri5", module=__name__)


def pf_ode_drift(eps_fn: Callable, gamma_fn: Callable, cond=None) -> Callable:
    """The drift of the probability-flow ODE (PF-ODE above).

    Args:
        eps_fn: ``(z_t, gamma_t, cond) -> eps_hat``.
        gamma_fn: ``t [B] -> gamma_t`` ([B] or [B, *shape]).
        cond: passed to ``eps_fn`` untouched.

    Returns:
        ``drift(t, z) -> dz / dt`` [B, *shape], t a scalar.
    """
    def drift(t, z):
        tt = jnp.full((z.shape[0],), t, z.dtype)
        gamma, rate = jax.jvp(gamma_fn, (tt,), (jnp.ones_like(tt),))
        sigma_sq = jax.nn.sigmoid(diffusion.expand_to(gamma, z))
        return 0.5 * diffusion.expand_to(rate, z) * (jnp.sqrt(sigma_sq) * eps_fn(z, gamma, cond) - sigma_sq * z)
    return drift


class SolverError(RuntimeError):
    """An adaptive ODE solve ran out of steps before the end of its interval (one line)."""


@contextlib.contextmanager
def naming_max_steps(field: str):
    """Within it, diffrax's "maximum number of solver steps" (raised inside a compiled call, it reaches
    Python as a JAX runtime error) becomes a one-line SolverError naming the config ``field``.

    Raises:
        SolverError: the solve inside ran out of steps.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only the solver's running out of steps is turned into one line
        if "maximum number of solver steps was reached" not in str(e):
            raise
        raise SolverError(f"the adaptive ODE solver used all {field} steps before the end of its interval: "
                          "raise it, or loosen rtol / atol") from None


def solve_ode(vector_field: Callable, y0, t_start: jax.Array, t_end: jax.Array, *, rtol: float,
              atol: float, solver: str = "tsit5", max_steps: int = 4096, on_progress: Callable | None = None):
    """diffrax: integrate dy/dt = vector_field(t, y) from t_start to t_end.

    Tsit5 and Dopri5 are 7-stage methods whose last stage is the next step's first (FSAL): 6 new
    evaluations per attempted step plus one.

    Args:
        vector_field: ``(t, y) -> dy / dt`` (y any pytree).
        y0: y at t_start.
        t_start, t_end: the interval (scalars; t_end < t_start integrates backwards).
        rtol, atol: the PID step-size controller's tolerances.
        solver: a name in ``SOLVERS``.
        max_steps: the most steps the solve may take.
        on_progress: called on the host with the fraction of the interval done after each step (a
            ``jax.debug.callback``: diffrax's progress meter).

    Returns:
        (y at t_end, network evaluations: an int32 scalar).

    Raises:
        ValueError: an unknown solver.
    """
    solver_class = registry.lookup(SOLVERS, solver, "ODE solver")
    from vdm import ode_solver  # diffrax: imported when an ODE is first solved (0.6 s), see vdm.ode_solver

    return ode_solver.solve(vector_field, y0, t_start, t_end, rtol=rtol, atol=atol, solver_class=solver_class,
                            max_steps=max_steps, on_progress=on_progress)


def ode(rng: jax.Array, eps_fn: Callable, gamma_fn: Callable, batch: int, cond=None, *, num_steps: int = 0,
        rtol: float = 1e-4, atol: float = 1e-4, solver: str = "tsit5", max_steps: int = 4096,
        segments: int = 1) -> Plan:
    """The PF-ODE from t = 1 down to t = 0, solved adaptively by diffrax (Kidger 2021).

    ``num_steps`` is not used: the PID controller picks the steps for ``rtol``/``atol``
    (score_sde's sampler uses RK45 at 1e-5). Deterministic: ``rng`` is unused. ``segments`` > 1
    solves the ODE over that many equal t intervals in turn (each with its own step-size start, a
    few more evaluations): the trainer then shows progress and can stop between them.

    Args:
        rng, eps_fn, gamma_fn, batch, cond, num_steps: see ``vdm.sampler_plan.PlanFunction``.
        rtol, atol, solver, max_steps: the solve's, see :func:`solve_ode`.
        segments: the number of equal t intervals solved in turn (the plan's steps).

    Returns:
        The :class:`Plan` of ``segments`` steps; its nfe is the solver's count of network evaluations.
    """
    del rng, num_steps, batch
    edges = jnp.linspace(1.0, 0.0, segments + 1)
    drift = pf_ode_drift(eps_fn, gamma_fn, cond)

    def step(i, carry):
        z, nfe = carry
        z, n = solve_ode(drift, z, edges[i], edges[i + 1], rtol=rtol, atol=atol, solver=solver, max_steps=max_steps)
        return z, nfe + n

    return Plan(segments, lambda z_1: (z_1, jnp.int32(0)), step, lambda carry: carry)
