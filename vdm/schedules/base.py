"""The contract of a noise schedule: the abstract base class ``Schedule``, the typed parameters a schedule holds
(``ScheduleEndpoint``, ``ScheduleShape``), the one check of a range (``check_endpoints``) and the endpoints that
every shipped schedule keeps (``_Endpoints``); ``check_contract``, the static check a registration runs."""
from __future__ import annotations

import abc
import functools
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import options


class ScheduleEndpoint(nnx.Param):
    """A learned endpoint parameter of a noise schedule (gamma_min / gamma_max)."""


class ScheduleShape(nnx.Param):
    """A parameter of a schedule's interior shape (endpoints excluded)."""


def _inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def check_endpoints(gamma_min: float, gamma_max: float) -> None:
    """The one check of a schedule's range: gamma_min < gamma_max.

    Every shipped schedule runs it (through ``_Endpoints``), ``vdm.configlib.validate`` asks it for
    ``config.model.gamma_min`` / ``gamma_max``, and the networks, which normalise gamma by the
    same range, run it when built directly.

    Args:
        gamma_min: gamma(0), the noise level at the data end.
        gamma_max: gamma(1), at the noise end.

    Raises:
        vdm.options.OptionError: ``gamma_min=...: must be below gamma_max=...``.
    """
    if not gamma_min < gamma_max:
        raise options.OptionError("gamma_min", gamma_min, f"must be below gamma_max={gamma_max}")


class _Endpoints(nnx.Module):
    """gamma_min and gamma_max, fixed numbers or learned with gamma_max > gamma_min kept; one pair, or one pair
    per element of ``shape`` (then returned as [1, *shape], the broadcast shape of ``vdm.diffusion``)."""

    def __init__(self, gamma_min: float, gamma_max: float, learned: bool, shape: tuple = ()):
        check_endpoints(gamma_min, gamma_max)
        self.learned = learned
        self.shape = tuple(shape)
        if learned:
            self.low = ScheduleEndpoint(jnp.full(self.shape, gamma_min, jnp.float32))
            # gamma_max = gamma_min + softplus(width): the order can never flip.
            self.width = ScheduleEndpoint(jnp.full(self.shape, _inverse_softplus(gamma_max - gamma_min), jnp.float32))
        else:
            self.fixed = (float(gamma_min), float(gamma_max))

    def __call__(self) -> tuple[jax.Array, jax.Array]:
        if self.learned:
            low = self.low[...]
            low, high = low, low + jax.nn.softplus(self.width[...])
        else:
            low, high = jnp.float32(self.fixed[0]), jnp.float32(self.fixed[1])
        if self.shape:
            low, high = (jnp.broadcast_to(v, (1,) + self.shape) for v in (low, high))
        return low, high


class Schedule(nnx.Module):
    """A noise schedule t -> gamma(t) = -log SNR(t), increasing on [0, 1]: what ``vdm.schedules.register`` takes.

    A subclass gives ``endpoints()``, ``__call__`` and ``learns_endpoints``; it overrides the class attributes
    below where they are not its defaults. Its constructor is called as
    ``cls(gamma_min, gamma_max, *, rngs, **kwargs)`` (``kwargs`` from ``config.model.schedule_kwargs``), with
    ``data_shape`` (the shape of one example) too if it is ``elementwise`` and ``latent_size`` if it is
    ``conditioned``. ``vdm.testing.check_piece("schedule", name)`` runs the behavioural checks of this contract.

    Attributes:
        elementwise: gamma has one value per element of the data, [B, *data_shape], not one per example [B]
            (class attribute; default False).
        conditioned: gamma depends on an auxiliary latent, ``schedule(t, latent)``; ``vdm.schedules.bind`` fixes
            the latent (class attribute; default False).
        learns_interior: the shape between the endpoints holds ``ScheduleShape`` parameters; the schedule then
            exposes ``shape(t)`` (``shape(t, latent)`` if conditioned), the normalised interior, 0 at t = 0 and
            1 at t = 1 (class attribute; default False).
        learns_endpoints: gamma(0) and gamma(1) are ``ScheduleEndpoint`` parameters (the subclass gives it: a class
            attribute or a property).
    """

    elementwise: bool = False
    conditioned: bool = False
    learns_interior: bool = False

    @property
    @abc.abstractmethod
    def learns_endpoints(self) -> bool:
        """Whether gamma(0) and gamma(1) are learned (held as ``ScheduleEndpoint`` parameters)."""

    @abc.abstractmethod
    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        """The declared (gamma(0), gamma(1)), which the bound uses directly.

        Returns:
            Two float32 scalars, or for an ``elementwise`` schedule two arrays [1, *data_shape] (or scalars).
        """

    @abc.abstractmethod
    def __call__(self, t: jax.Array, *latent: jax.Array) -> jax.Array:
        """gamma(t).

        Args:
            t: times [B] in [0, 1].
            *latent: for a ``conditioned`` schedule only, the latents [B, latent_size].

        Returns:
            gamma [B] float32, or [B, *data_shape] for an ``elementwise`` schedule; strictly increasing in t.
        """


class _WithEndpoints(Schedule):
    """A schedule whose ``endpoints()`` is the ``_Endpoints`` submodule its constructor stores as ``self.endpoints``
    (the parameters' path ``endpoints/low``, ``endpoints/width``), and which learns its endpoints when they are
    learned. Every shipped schedule is one."""

    endpoints = None  # replaced in each instance by its _Endpoints (called the same way: endpoints())

    @property
    def learns_endpoints(self) -> bool:
        return self.endpoints.learned


def schedule_class(piece: Any) -> Any:
    """The class a registered piece builds: ``piece`` itself, or the class inside a (nested) ``functools.partial``.

    Args:
        piece: what a schedule registration holds (a class, or a partial of one).

    Returns:
        The innermost ``func`` of the partials (``piece`` when it is no partial); not checked to be a class.
    """
    while isinstance(piece, functools.partial):
        piece = piece.func
    return piece


def _partial_arguments(piece: Any) -> tuple[tuple, dict]:
    """The positional and keyword arguments the (nested) partials of ``piece`` bind, innermost first."""
    args, keywords = (), {}
    while isinstance(piece, functools.partial):
        args, keywords = piece.args + args, {**piece.keywords, **keywords}
        piece = piece.func
    return args, keywords


def check_contract(name: str, piece: Any) -> None:
    """The static contract of a schedule, run when it is registered: cheap, nothing is built.

    ``piece`` must be a subclass of ``Schedule`` (or a ``functools.partial`` of one) that implements every abstract
    member, declares ``elementwise`` / ``conditioned`` / ``learns_interior`` as booleans, and whose constructor
    takes ``(gamma_min, gamma_max, *, rngs, **kwargs)``, with ``data_shape`` if elementwise and ``latent_size`` if
    conditioned.

    Args:
        name: the name it is registered under (for messages).
        piece: the class or partial.

    Raises:
        TypeError: one line naming what the piece lacks.
    """
    cls = schedule_class(piece)
    if not (isinstance(cls, type) and issubclass(cls, Schedule)):
        raise TypeError(f"{cls!r} is not a subclass of vdm.schedules.Schedule (nor a functools.partial of one)")
    if cls.__abstractmethods__:
        raise TypeError(f"{cls.__name__} does not implement {', '.join(sorted(cls.__abstractmethods__))} "
                        "(abstract in vdm.schedules.Schedule)")
    for flag in ("elementwise", "conditioned", "learns_interior"):
        value = getattr(cls, flag)
        if not isinstance(value, bool):
            raise TypeError(f"{cls.__name__}.{flag} must be a class attribute True or False, not {value!r}")
    needed = {"rngs": None}
    if cls.elementwise:
        needed["data_shape"] = (1,)
    if cls.conditioned:
        needed["latent_size"] = 1
    args, keywords = _partial_arguments(piece)
    try:
        signature = inspect.signature(cls.__init__)
        signature.bind_partial(None, *args, 0.0, 1.0, **{**keywords, **needed})  # None: self
    except (TypeError, ValueError) as e:
        taken = ", ".join(["gamma_min", "gamma_max", "*", *needed])
        raise TypeError(f"{cls.__name__}'s constructor must take ({taken}, **kwargs): {e}") from None
