"""What a sampler is: a :class:`Plan` (a loop that can run in chunks), the plan function that makes it, and
the static contract a sampler meets when it is registered (``vdm.samplers.register``).

A sampler is written as a *plan function* (:class:`PlanFunction`)::

    plan(rng, eps_fn, gamma_fn, batch, cond, *, num_steps, **options) -> Plan

``vdm.samplers.register`` turns it into the one-call :class:`Sampler` ``(rng, eps_fn, gamma_fn, z_1, cond=None,
*, num_steps, **options) -> (z_0, nfe)`` that ``vdm.samplers.SAMPLERS`` holds, with the plan function (its
options checked first) as ``sampler.plan``. ``vdm.samplers.generation`` calls
``sampler.plan(rng, eps_fn, gamma_fn, batch, cond, num_steps=..., **config.sample.sampler_kwargs)``, so
:func:`contract` asks exactly that of a registration: the five positional parameters by those names,
``num_steps`` by keyword, and a default for every other option (a config may leave any of them out). What a
sampler does with them (shapes, its key, determinism, chunks) is checked by ``vdm.testing.sampler`` on the
registration's :class:`Example`.
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Protocol

import jax

from vdm import registry

# eps_fn(z_t [B, *shape], gamma_t [B] or [B, *shape], cond) -> eps_hat [B, *shape];  gamma_fn(t [B]) -> gamma_t
EpsFn = Callable[[jax.Array, jax.Array, Any], jax.Array]
GammaFn = Callable[[jax.Array], jax.Array]

PLAN_PARAMETERS = ("rng", "eps_fn", "gamma_fn", "batch", "cond")  # positional, as generation() passes them


class Plan(NamedTuple):
    """A sampler as a loop: ``carry = init(z_1)``; ``carry = step(i, carry)`` for i = 0..num_steps-1;
    ``(z_0, nfe) = result(carry)``. ``step`` depends on ``i`` only through its argument, so
    running the steps in several calls gives what one call gives.

    Attributes:
        num_steps: the loop's length, a Python int (static: the trainer splits the loop into chunks by it).
        init: z_1 [B, *shape] -> the carry.
        step: (i, carry) -> carry, i an int32 scalar (traced).
        result: carry -> (z_0 [B, *shape] in z_1's dtype, nfe: an integer scalar, the network evaluations).
    """

    num_steps: int
    init: Callable[[jax.Array], Any]
    step: Callable[[jax.Array, Any], Any]
    result: Callable[[Any], tuple[jax.Array, jax.Array]]


def advance(plan: Plan, carry, start, stop):
    """Steps ``start``..``stop - 1`` of ``plan`` (traced bounds: one compiled loop serves every chunk).

    Args:
        plan: the sampler's loop.
        carry: the carry after step ``start - 1`` (``plan.init(z_1)`` for ``start = 0``).
        start, stop: int scalars (Python or traced), 0 <= start <= stop <= plan.num_steps.

    Returns:
        The carry after step ``stop - 1``.
    """
    return jax.lax.fori_loop(start, stop, plan.step, carry)


def run(plan: Plan, z_1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The whole loop in one call.

    Args:
        plan: the sampler's loop.
        z_1: the noise [B, *shape].

    Returns:
        (z_0 [B, *shape], nfe: an integer scalar).
    """
    return plan.result(jax.lax.fori_loop(0, plan.num_steps, plan.step, plan.init(z_1)))


class PlanFunction(Protocol):
    """The contract of a sampler as it is written: ``rng`` its key (for its own draws), ``eps_fn(z_t, gamma_t,
    cond)`` the network's eps_hat (classifier-free guidance included), ``gamma_fn(t [B])`` the schedule (gamma
    per example [B] or per element [B, *shape]), ``batch`` the number of samples, ``cond`` passed to ``eps_fn``
    untouched, ``num_steps`` the caller's step count (a sampler that chooses its own may ignore it) and
    ``options`` its keyword options (``config.sample.sampler_kwargs``), each with a default."""

    def __call__(self, rng: jax.Array, eps_fn: EpsFn, gamma_fn: GammaFn, batch: int, cond: Any, *, num_steps: int,
                 **options: Any) -> Plan: ...


class Sampler(Protocol):
    """What ``vdm.samplers.SAMPLERS`` holds: the sampler in one call, ``(z_0, nfe)`` of ``z_1`` [B, *shape],
    and its plan function (options checked) as ``plan``."""

    plan: PlanFunction

    def __call__(self, rng: jax.Array, eps_fn: EpsFn, gamma_fn: GammaFn, z_1: jax.Array, cond: Any = None, *,
                 num_steps: int, **options: Any) -> tuple[jax.Array, jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class Example:
    """A registration's example: the small run its checks (``vdm.testing.sampler``) make.

    Attributes:
        options: the sampler's keyword options for the run (``config.sample.sampler_kwargs``); empty: its defaults.
        num_steps: the run's ``num_steps``.
        deterministic: whether the sampler with these options ignores its key. True: the same z_1 must give the
            same z_0 whatever the key; False: two keys must give different samples.
    """

    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    num_steps: int = 8
    deterministic: bool = False


def examples(example: Example | tuple | list | None) -> tuple[Example, ...]:
    """A registration's ``example`` as a tuple of :class:`Example` (``None``: one default ``Example()``).

    Raises:
        TypeError: ``example`` is neither an Example, a non-empty sequence of them, nor None.
    """
    if example is None:
        return (Example(),)
    found = (example,) if isinstance(example, Example) else tuple(example) if isinstance(example, (tuple, list)) else ()
    if not found or not all(isinstance(e, Example) for e in found):
        raise TypeError(f"example={example!r}: must be a vdm.samplers.Example, a non-empty tuple of them, or None")
    return found


def contract(name: str, piece: Any) -> None:
    """The static contract of a sampler, checked when it is registered (nothing runs).

    Args:
        name: the name it is registered under (for messages).
        piece: a :class:`Sampler`, as ``vdm.samplers.register`` makes it of a plan function.

    Raises:
        TypeError: ``piece`` is not callable or has no callable ``plan``; the plan function does not begin
            ``(rng, eps_fn, gamma_fn, batch, cond`` (positional), takes no ``num_steps`` keyword, or has an
            option without a default.
    """
    del name
    wanted = "a plan function (rng, eps_fn, gamma_fn, batch, cond, *, num_steps, **options) -> Plan"
    if not callable(piece):
        raise TypeError(f"{piece!r} is not callable: register {wanted}")
    try:
        plan = piece.plan
    except AttributeError:
        raise TypeError(f"{piece!r} has no .plan: register {wanted} with vdm.samplers.register") from None
    if not callable(plan):
        raise TypeError(f"its .plan {plan!r} is not callable: register {wanted} with vdm.samplers.register")
    params = registry.parameters(plan)
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if tuple(positional[:len(PLAN_PARAMETERS)]) != PLAN_PARAMETERS:
        raise TypeError(f"its plan function must begin ({', '.join(PLAN_PARAMETERS)}, ...); it begins "
                        f"({', '.join(positional[:len(PLAN_PARAMETERS)])})")
    by_name = {p.name: p for p in params}
    if "num_steps" not in by_name or by_name["num_steps"].kind == inspect.Parameter.POSITIONAL_ONLY:
        raise TypeError("its plan function takes no num_steps keyword (one that chooses its own steps: "
                        "num_steps: int = 0, unused)")
    for p in params[len(PLAN_PARAMETERS):]:
        if p.name != "num_steps" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty:
            raise TypeError(f"its option {p.name!r} has no default (a config may leave every option out)")
