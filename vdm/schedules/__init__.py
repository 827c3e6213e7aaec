"""Noise schedules gamma(t) = -log SNR(t), increasing on [0, 1].

Every schedule is a Flax NNX module, a subclass of ``Schedule`` (``base.py``, the contract), called as
``gamma = schedule(t)`` (a schedule that declares ``conditioned`` is called as ``schedule(t, latent)``;
``bind`` fixes its latent) with t of shape
[B] (values in [0, 1]) and gamma of shape [B] -- or, for a schedule that declares
``elementwise = True``, of shape [B, *data_shape]: one schedule per element of the data (each
channel of each pixel), built with ``data_shape``. It satisfies gamma(0) = gamma_min and
gamma(1) = gamma_max (per element where it is per element), and declares them:
``schedule.endpoints()`` returns (gamma_min, gamma_max), fixed or learned, scalars or
[1, *data_shape], which the bound uses directly.
gamma'(t) is never written by hand: the loss takes it from ``jax.jvp``. Every schedule
also says what it learns: ``learns_endpoints`` (gamma_min / gamma_max are parameters) and
``learns_interior`` (the shape between them is; such a schedule exposes ``shape(t)``,
the normalised interior, for the variance-minimising gradient of VDM App. I.2).

| name            | gamma(t)                                               | learned            |
|-----------------|--------------------------------------------------------|--------------------|
| fixed_linear    | g0 + (g1 - g0) t                                       | nothing            |
| learned_linear  | g0 + (g1 - g0) t                                       | g0, g1             |
| monotone_net    | g0 + (g1 - g0) shape(t), shape a monotone network       | shape; g0, g1 opt. |
| cosine          | 2 log tan(a t + b), pinned to [g0, g1]                 | nothing            |
| shifted_cosine  | 2 log tan(a t + b) + shift, pinned to [g0, g1]         | nothing            |
| optimal_transport | 2 log(s / (1 - s)), s linear in t from s0 to s1 (g0, g1) | nothing          |
| per_pixel_polynomial | per element: g0_i + (g1_i - g0_i) P_i(t) / P_i(1), P_i' = (a_i t^2 + b_i t + c_i)^2 | a, b, c; g0_i, g1_i opt. |
| latent_polynomial | the same, a, b, c a network of a latent c of the input (MuLAN) | that network; g0_i, g1_i opt. |

One module per family: ``linear.py`` (fixed_linear, learned_linear), ``monotone_net.py``, ``cosine.py``
(cosine, shifted_cosine), ``optimal_transport.py``, ``polynomial.py`` (per_pixel_polynomial,
latent_polynomial and their ``monotone_quintic``).

Learned parameters are typed so that filters can pick them out: ``ScheduleEndpoint``
for g0 and g1, ``ScheduleShape`` for the interiors of ``monotone_net``, ``per_pixel_polynomial`` and
``latent_polynomial``. Both subclass
``nnx.Param`` (weight decay, ``vdm.weight_decay``, is for dense and convolution kernels only),
and the variance-minimising gradient (``vdm.model``, through
``diffusion.value_and_grad_with_schedule_variance``) treats ``ScheduleShape`` as the
interior.

A new schedule, here or in a user's module, is one subclass of ``Schedule`` decorated with ``@register``::

    @schedules.register("my_schedule", example={"kwargs": {"power": 2.0}})
    class MySchedule(schedules.Schedule):
        ...

Registration checks the class statically (``base.check_contract``); ``vdm.testing.check_piece("schedule",
"my_schedule")`` runs the behavioural checks (``vdm.testing.schedule``) with the registration's ``example``:
a dict with any of ``data_shape`` (default (2, 3)), ``latent_size`` (default 4) and ``kwargs`` (the small
constructor arguments of a tiny build, default {}).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx

from vdm import options, registry
from vdm.schedules.base import (Schedule, ScheduleEndpoint, ScheduleShape, check_contract, check_endpoints,
                                schedule_class)

SCHEDULES: registry.Registry = registry.Registry("schedule", check_contract)


def register(name: str, *, example: dict | None = None) -> Callable[[Any], Any]:
    """Register a schedule under ``name``: ``@register("name")`` above a subclass of ``Schedule``.

    Args:
        name: the name ``config.model.schedule`` gives (not yet registered).
        example: what the contract checks need to build it tiny (``vdm.testing.schedule``): a dict with any of
            ``data_shape``, ``latent_size`` and ``kwargs``; ``None`` for the default.

    Returns:
        A decorator that registers a class (or a ``functools.partial`` of one) and returns it unchanged.

    Raises:
        vdm.registry.RegistrationError: (from the decorator) the name is taken, or the piece fails
            ``base.check_contract``: not a ``Schedule``, an abstract member left, a constructor that does not
            take ``(gamma_min, gamma_max, *, rngs, ...)`` (with ``data_shape`` / ``latent_size`` where declared).
    """

    def add(piece):
        inner = schedule_class(piece)
        module = inner.__module__ if isinstance(inner, type) else None  # a partial's own module reads "functools"
        return SCHEDULES.register(name, piece, example=example, module=module)

    return add


# The shipped schedules register themselves on import, with ``register`` above, in the order of the table (which
# an unknown name's error lists).
from vdm.schedules import linear, monotone_net, cosine, optimal_transport, polynomial  # noqa: E402, F401, I001
from vdm.schedules.cosine import Cosine, ShiftedCosine  # noqa: E402
from vdm.schedules.linear import Linear  # noqa: E402
from vdm.schedules.monotone_net import MonotoneNet  # noqa: E402
from vdm.schedules.optimal_transport import OptimalTransport  # noqa: E402
from vdm.schedules.polynomial import (QUINTIC_SLACK, LatentPolynomial, PerPixelPolynomial,  # noqa: E402
                                      monotone_quintic)

class BoundToLatent(NamedTuple):
    """A schedule conditioned on a latent (``conditioned``), bound to one: the ``t -> gamma`` callable, with the
    schedule's ``endpoints()``.

    Attributes:
        schedule: the conditioned schedule.
        latent: the latents [B, latent_size], one per example of the ``t`` it is called with.
    """

    schedule: Schedule
    latent: jax.Array

    def __call__(self, t: jax.Array) -> jax.Array:
        """gamma [B] or [B, *data_shape] of t [B], for the bound latents."""
        return self.schedule(t, self.latent)

    def endpoints(self):
        """The schedule's declared endpoints (not conditioned on the latent)."""
        return self.schedule.endpoints()


def bind(schedule: Callable, latent: jax.Array | None) -> Callable:
    """``t -> gamma`` of ``schedule``: itself, or for a schedule conditioned on a latent, bound to ``latent``.

    Args:
        schedule: a ``Schedule``, or any ``t -> gamma`` callable (returned as it is).
        latent: [B, latent_size] for a ``conditioned`` schedule; otherwise ignored.

    Returns:
        ``schedule``, or ``BoundToLatent(schedule, latent)``.

    Raises:
        ValueError: a conditioned schedule without a latent.
    """
    if not (isinstance(schedule, Schedule) and schedule.conditioned):
        return schedule
    if latent is None:
        raise ValueError("this schedule is conditioned on a latent (model.latent_size > 0): it needs one")
    return BoundToLatent(schedule, latent)


def construct(piece: Any, *, name: str, gamma_min: float, gamma_max: float, rngs: nnx.Rngs | None = None,
              data_shape: tuple | None = None, latent_size: int = 0, **kwargs) -> Schedule:
    """Build the schedule ``piece`` (a registered class or partial, or one not registered) as ``build`` does.

    Args:
        piece: a subclass of ``Schedule`` or a ``functools.partial`` of one.
        name: its name, for messages.
        gamma_min, gamma_max: the endpoints.
        rngs: the random streams of its initialisation (``nnx.Rngs(0)`` if None).
        data_shape: the shape of one example; passed only to an ``elementwise`` schedule, which needs it.
        latent_size: the size of the latent; passed only to a ``conditioned`` schedule, which needs it > 0.
        **kwargs: the schedule's own arguments (``config.model.schedule_kwargs``).

    Returns:
        The schedule.

    Raises:
        ValueError: an elementwise schedule without ``data_shape``, or arguments the schedule does not take.
        vdm.options.OptionError: a conditioned schedule with ``latent_size`` 0, or a bad range or option.
    """
    cls = schedule_class(piece)
    if rngs is None:
        rngs = nnx.Rngs(0)
    if cls.elementwise:
        if data_shape is None:
            raise ValueError(f"schedule {name!r} is per element: it needs data_shape")
        kwargs["data_shape"] = data_shape
    if cls.conditioned:
        if not latent_size:
            raise options.OptionError("latent_size", latent_size, f"schedule {name!r} is conditioned on an auxiliary "
                                      "latent: set model.latent_size > 0")
        kwargs["latent_size"] = latent_size
    try:
        return piece(gamma_min, gamma_max, rngs=rngs, **kwargs)
    except TypeError as e:
        raise ValueError(f"schedule {name!r}: {e}") from None


def build(name: str, *, gamma_min: float, gamma_max: float, rngs: nnx.Rngs | None = None,
          data_shape: tuple | None = None, latent_size: int = 0, **kwargs) -> Schedule:
    """The schedule registered as ``name`` with endpoints [gamma_min, gamma_max].

    An element-wise one (``elementwise``) gets ``data_shape``, the shape of one example, and one conditioned on a
    latent (``conditioned``) its ``latent_size``; see ``construct`` for the arguments.

    Returns:
        The schedule: ``t [B] -> gamma [B]`` (or ``[B, *data_shape]``; ``(t, latent)`` if conditioned).

    Raises:
        ValueError: an unknown name (naming the valid ones), or as ``construct``.
    """
    piece = SCHEDULES.lookup(name)
    return construct(piece, name=name, gamma_min=gamma_min, gamma_max=gamma_max, rngs=rngs, data_shape=data_shape,
                     latent_size=latent_size, **kwargs)


__all__ = ["SCHEDULES", "QUINTIC_SLACK", "BoundToLatent", "Cosine", "LatentPolynomial", "Linear", "MonotoneNet",
           "OptimalTransport", "PerPixelPolynomial", "Schedule", "ScheduleEndpoint", "ScheduleShape", "ShiftedCosine",
           "bind", "build", "check_contract", "check_endpoints", "construct", "monotone_quintic", "register",
           "schedule_class"]
