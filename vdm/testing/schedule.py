"""The contract checks of a noise schedule (``vdm.schedules``): run on every registered one by the suite.

A schedule is a subclass of :class:`vdm.schedules.Schedule` (or a ``functools.partial`` of one). Built tiny from
its example (the registration's ``example``: a dict with any of ``data_shape``, ``latent_size`` and ``kwargs``,
merged into :data:`DEFAULT_EXAMPLE`) for each range [gamma_min, gamma_max] of :data:`RANGES`, on a grid of t in
[0, 1], it must

- meet the static contract (``vdm.schedules.check_contract``) and build to a ``Schedule``;
- declare what it learns truly: ``learns_endpoints`` iff it holds ``ScheduleEndpoint`` parameters,
  ``learns_interior`` iff it holds ``ScheduleShape`` ones (and no other parameters), and then expose
  ``shape(t)`` going from 0 at t = 0 to 1 at t = 1;
- give gamma [B] (or [B, *data_shape] if ``elementwise``), float32, finite, with a finite gamma'(t) (``jax.jvp``)
  that agrees with a finite difference, the same under ``jax.jit`` as without;
- declare its endpoints: ``endpoints()`` (float32 scalars, or [1, *data_shape] if elementwise) equal to gamma(0)
  and gamma(1), and to (gamma_min, gamma_max) as built; they carry no gradient to the interior;
- be strictly increasing in t on the grid, with gamma'(t) >= 0 (0 allowed at isolated points: t^2 at t = 0);
- if it learns anything: have finite, not all zero, gradients, and stay all of the above (endpoints equal to
  its curve, increasing) with every learned parameter moved at random, as an optimiser may move it.

A ``conditioned`` schedule is checked through ``vdm.schedules.bind``, for each of :data:`NUM_LATENTS` random
latents (its parameters moved at random as well: at initialisation every latent may give the same curve).
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdm import schedules, testing

DEFAULT_EXAMPLE = MappingProxyType({"data_shape": (2, 3), "latent_size": 4, "kwargs": MappingProxyType({})})
RANGES = ((-13.3, 5.0), (-20.0, 20.0), (-2.0, 2.0))  # [gamma_min, gamma_max]: VDM's, wide, narrow
T = jnp.linspace(0.0, 1.0, 1001)  # the grid of t (float32)
NUM_LATENTS = 3  # random latents of a conditioned schedule
LATENT_SCALE = 3.0  # their standard deviation: far from the origin, where the curves differ most
PERTURBATION = 0.5  # the standard deviation of the random move of every learned parameter


def _example(example: dict | None) -> dict:
    merged = {**DEFAULT_EXAMPLE, **(example or {})}
    unknown = sorted(set(merged) - set(DEFAULT_EXAMPLE))
    if unknown:
        raise ValueError(f"schedule example: unknown keys {unknown}; valid keys: {', '.join(DEFAULT_EXAMPLE)}")
    return merged


def _rows(latent: jax.Array | None, t: jax.Array) -> jax.Array | None:
    """One latent [latent_size] as the latents [B, latent_size] of every t [B] (None: not conditioned)."""
    return None if latent is None else jnp.broadcast_to(latent, (t.shape[0],) + latent.shape)


def _gamma_and_slope(schedule, latent, t):
    fn = schedules.bind(schedule, _rows(latent, t))
    return jax.jvp(fn, (t,), (jnp.ones_like(t),))


_compiled_gamma_and_slope = jax.jit(_gamma_and_slope)


def _columns(gamma) -> np.ndarray:
    """gamma [T] or per element [T, *data_shape] as [T, curves]: one column per element's curve."""
    gamma = np.asarray(gamma)
    return gamma.reshape(gamma.shape[0], -1)


def _perturbed(schedule, seed: int):
    """A copy of ``schedule`` with every ``nnx.Param`` moved by N(0, PERTURBATION^2) noise (drawn by NumPy: nothing
    to compile)."""
    graphdef, params, rest = nnx.split(schedule, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    moved = jax.tree_util.tree_map(
        lambda x: x + jnp.asarray(PERTURBATION * rng.standard_normal(jnp.shape(x)), jnp.result_type(x)), params)
    return nnx.merge(graphdef, moved, rest)


@jax.jit
def _gradients(schedule, latent):
    """The gradients of sum sin(gamma(T)) and of the sum of the declared endpoints, by the schedule's parameters."""
    of_curve = nnx.grad(lambda s: jnp.sum(jnp.sin(schedules.bind(s, _rows(latent, T))(T))))(schedule)
    of_endpoints = nnx.grad(lambda s: sum(jnp.sum(g) for g in s.endpoints()))(schedule)
    return of_curve, of_endpoints


def _assert_close(actual, desired, what: str, *, atol: float, rtol: float = 0.0) -> None:
    """One line naming ``what`` and the worst element when ``|actual - desired| > atol + rtol |desired|``."""
    actual, desired = np.broadcast_arrays(np.asarray(actual, np.float64), np.asarray(desired, np.float64))
    excess = np.abs(actual - desired) - (atol + rtol * np.abs(desired))
    if np.any(~(excess <= 0)):
        i = np.unravel_index(np.nanargmax(np.where(np.isnan(excess), np.inf, excess)), excess.shape)
        raise AssertionError(f"{what}: {actual[i]:.6g} against {desired[i]:.6g} (at index {tuple(int(j) for j in i)}; "
                             f"tolerance {atol:.3g} + {rtol:.3g} relative)")


def check(name: str, piece: Any, example: dict | None) -> None:
    """Run every check of the schedule contract on ``piece`` (see the module's docstring).

    Args:
        name: its name, for messages.
        piece: a subclass of ``vdm.schedules.Schedule`` or a ``functools.partial`` of one (what ``SCHEDULES`` holds).
        example: ``{"data_shape": ..., "latent_size": ..., "kwargs": {...}}`` (any of them; the rest from
            :data:`DEFAULT_EXAMPLE`), or ``None`` for the default.

    Raises:
        AssertionError: ``schedule '<name>' fails <check>: <what was found>``.
        ValueError: an example with unknown keys.
    """
    checking = testing.checker("schedule", name)

    example = _example(example)
    with checking("the static contract"):
        schedules.check_contract(name, piece)
    data_shape = tuple(example["data_shape"])
    for gamma_min, gamma_max in RANGES:
        with checking("construction"):
            schedule = schedules.construct(piece, name=name, gamma_min=gamma_min, gamma_max=gamma_max,
                                           rngs=nnx.Rngs(0), data_shape=data_shape,
                                           latent_size=example["latent_size"], **example["kwargs"])
            assert isinstance(schedule, schedules.Schedule), f"built a {type(schedule).__name__}, not a Schedule"
        latents = [None]
        if schedule.conditioned:
            draws = np.random.default_rng(1).standard_normal((NUM_LATENTS, example["latent_size"]))
            latents = list(jnp.asarray(LATENT_SCALE * draws, jnp.float32))
        if (gamma_min, gamma_max) == RANGES[0]:
            _check_parameters(checking, schedule, latents[0])
        for latent in latents:
            _check_curve(checking, schedule, latent, data_shape, (gamma_min, gamma_max))
        if schedule.learns_endpoints or schedule.learns_interior:
            moved = _perturbed(schedule, 2)
            for latent in latents:
                _check_curve(checking, moved, latent, data_shape, None)


def _check_parameters(checking, schedule, latent) -> None:
    """What it declares it learns, against the parameters it holds; its gradients (for one latent, None if not
    conditioned); the endpoints' gradient; gamma the same without jit."""
    with checking("declarations"):
        endpoints = jax.tree_util.tree_leaves(nnx.state(schedule, schedules.ScheduleEndpoint))
        interior = jax.tree_util.tree_leaves(nnx.state(schedule, schedules.ScheduleShape))
        params = jax.tree_util.tree_leaves(nnx.state(schedule, nnx.Param))
        assert schedule.learns_endpoints == bool(endpoints), (
            f"learns_endpoints={schedule.learns_endpoints} but it holds {len(endpoints)} ScheduleEndpoint parameters")
        assert schedule.learns_interior == bool(interior), (
            f"learns_interior={schedule.learns_interior} but it holds {len(interior)} ScheduleShape parameters")
        assert len(params) == len(endpoints) + len(interior), (
            "it holds parameters that are neither ScheduleEndpoint nor ScheduleShape")
        if schedule.learns_interior:
            assert hasattr(schedule, "shape"), "it learns its interior but has no shape(t)"
    with checking("jit"):
        gamma, _ = _compiled_gamma_and_slope(schedule, latent, T)
        plain = schedules.bind(schedule, _rows(latent, T))(T)
        _assert_close(plain, gamma, "gamma without jit against under jit", atol=1e-5, rtol=1e-5)
    if not params:
        return
    with checking("gradients"):
        of_curve, of_endpoints = _gradients(schedule, latent)
        leaves = [np.asarray(g) for g in jax.tree_util.tree_leaves(of_curve)]
        assert leaves and all(np.all(np.isfinite(g)) for g in leaves), "a gradient is not finite"
        assert any(np.any(g != 0) for g in leaves), "every gradient is zero"
    with checking("declared endpoints"):
        for path, g in jax.tree_util.tree_flatten_with_path(nnx.state(of_endpoints, schedules.ScheduleShape))[0]:
            assert np.all(np.asarray(g) == 0), f"endpoints() has a gradient in the interior parameter {path}"


def _check_curve(checking, schedule, latent, data_shape: tuple, expected: tuple | None) -> None:
    """gamma on the grid T for one latent (None: not conditioned); ``expected``: the built (gamma_min, gamma_max)."""
    per_element = data_shape if schedule.elementwise else ()
    with checking("shapes and dtypes"):
        gamma, slope = _compiled_gamma_and_slope(schedule, latent, T)
        for what, value in (("gamma", gamma), ("gamma'(t)", slope)):
            assert value.shape == T.shape + per_element, f"{what} of t {T.shape} has shape {value.shape}, expected " \
                                                         f"{T.shape + per_element}"
            assert value.dtype == jnp.float32, f"{what} is {value.dtype}, not float32"
        declared = schedules.bind(schedule, _rows(latent, T)).endpoints()
        assert len(declared) == 2, f"endpoints() gives {len(declared)} values, not (gamma_min, gamma_max)"
        for value in declared:
            assert jnp.shape(value) in {(), (1,) + per_element}, (
                f"an endpoint has shape {jnp.shape(value)}, expected () or {(1,) + per_element}")
            assert jnp.result_type(value) == jnp.float32, f"an endpoint is {jnp.result_type(value)}, not float32"
    gamma, slope = _columns(gamma), _columns(slope)
    with checking("finiteness"):
        assert np.all(np.isfinite(gamma)), f"gamma is not finite at t={float(T[np.nonzero(~np.isfinite(gamma))[0][0]])}"
        assert np.all(np.isfinite(slope)), f"gamma'(t) is not finite at t={float(T[np.nonzero(~np.isfinite(slope))[0][0]])}"
    scale = max(1.0, *(abs(g) for g in expected or (0.0,)), float(np.max(np.abs(gamma[[0, -1]]))))
    with checking("declared endpoints"):
        ends = [np.broadcast_to(np.ravel(np.asarray(v)), (gamma.shape[1],)) for v in declared]
        for what, value, curve in (("gamma(0)", ends[0], gamma[0]), ("gamma(1)", ends[1], gamma[-1])):
            _assert_close(value, curve, f"endpoints() against {what}", atol=2e-4 * scale)
        if expected is not None:
            for what, value, built in (("gamma_min", ends[0], expected[0]), ("gamma_max", ends[1], expected[1])):
                _assert_close(value, built, f"endpoints() against the {what} it was built with", atol=1e-5 * scale)
    with checking("monotonicity"):
        falls = np.nonzero(np.any(np.diff(gamma, axis=0) <= 0, axis=1))[0]
        assert not falls.size, f"gamma does not increase from t={float(T[falls[0]]):.4g} to t={float(T[falls[0] + 1]):.4g}"
        negative = np.nonzero(np.any(slope < 0, axis=1))[0]
        assert not negative.size, f"gamma'(t) < 0 at t={float(T[negative[0]]):.4g}"
    with checking("the derivative"):  # jvp against a central difference of the same curve, away from the ends
        step = float(T[1] - T[0])
        difference = (gamma[2:] - gamma[:-2]) / (2 * step)
        _assert_close(slope[100:-100], difference[99:-99], "gamma'(t) by jax.jvp against a finite difference",
                      atol=2e-2, rtol=2e-2)
    if schedule.learns_interior:
        with checking("declarations"):
            t = jnp.array([0.0, 1.0])
            ends = _columns(schedule.shape(t, *([] if latent is None else [_rows(latent, t)])))
            _assert_close(ends, np.broadcast_to([[0.0], [1.0]], ends.shape), "shape(t) at t = 0 and 1", atol=1e-6)
