"""Loss weightings w(lambda) of the weighted-ELBO family (Kingma & Gao 2023).

Kingma & Gao, "Understanding Diffusion Objectives as the ELBO with Simple Data
Augmentation", arXiv 2303.00848, show that the common diffusion objectives are all

    L_w(x) = 0.5 * E_{t ~ U(0,1), eps} [ w(lambda_t) * (-dlambda/dt) * ||eps - eps_hat||^2 ]
           = 0.5 * integral over lambda of w(lambda) * E_eps ||eps - eps_hat(z_lambda)||^2

with lambda = log SNR = -gamma. ``w = 1`` is the ELBO (the VDM continuous-time loss).
If w is monotonic (non-increasing in lambda, i.e. non-decreasing in t), L_w is the ELBO
of noise-augmented data (their Sec. 4), so it is still a likelihood objective.

Every weighting here is a small pure function ``w(logsnr, **params) -> w`` registered with the
flags it declares: ``monotonic`` (non-increasing in lambda) and ``is_elbo`` (w = 1). Constants
are chosen so that the loss equals the named objective exactly (not only up to a factor) when
its own noise schedule and uniform t are used; the docstrings give the derivation. Choose one by
name with ``build``:

    w = weightings.build("sigmoid", bias=2.0)
    w(logsnr), w.monotonic, w.is_elbo

A new weighting, here or in a user's module, is one decorated function (its other parameters
keyword arguments with defaults; ``example``: the parameters its contract checks use, default
its defaults); ``vdm.testing.check_piece("weighting", name)`` runs its contract checks::

    @weightings.register("my_weighting", monotonic=True)
    def my_weighting(logsnr, scale: float = 1.0):
        return jnp.exp(-jax.nn.softplus(logsnr / scale))
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import types
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from vdm import registry


class WeightingFn(Protocol):
    """A weighting's function: w(lambda) of log-SNR values, elementwise (same shape and dtype out as in).

    Its first parameter is ``logsnr``; every other one is a parameter of the weighting, with a default
    (``bias`` of ``sigmoid``), that ``build`` binds by keyword.
    """

    def __call__(self, logsnr: jax.Array, **params: Any) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Weighting:
    """A named weighting with its parameters bound; call it on log-SNR values (any shape: the same shape out).

    It declares what it is: ``monotonic`` (non-increasing in lambda, so the objective is an
    ELBO of noise-augmented data) and ``is_elbo`` (w = 1: the objective is the VLB itself).

    Attributes:
        name: its name in ``WEIGHTINGS``.
        fn: ``w(logsnr, **params)`` (``WeightingFn``).
        monotonic: w is non-increasing in lambda.
        is_elbo: w = 1 everywhere.
        params: ``((name, value), ...)``, bound by ``build``; hashable, so a Weighting can be a static jit argument.
    """

    name: str
    fn: WeightingFn
    monotonic: bool
    is_elbo: bool = False
    params: tuple = ()

    def __call__(self, logsnr):
        return self.fn(logsnr, **dict(self.params))


def check_contract(name: str, piece: Weighting) -> None:
    """The static contract of a weighting (run at registration; the behaviour is ``vdm.testing.weighting``'s).

    Args:
        name: the name it is registered as.
        piece: a :class:`Weighting`.

    Raises:
        TypeError: not a Weighting, flags that are not bools, or a function whose first parameter is not
            ``logsnr`` or with another parameter that has no default (or is ``*args`` / ``**kwargs``).
        ValueError: ``is_elbo`` without ``monotonic`` (w = 1 is monotonic).
    """
    if not isinstance(piece, Weighting):
        raise TypeError(f"a weighting is a vdm.weightings.Weighting, not {type(piece).__name__}")
    for flag, value in (("monotonic", piece.monotonic), ("is_elbo", piece.is_elbo)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag}={value!r} must be a bool")
    if piece.is_elbo and not piece.monotonic:
        raise ValueError("is_elbo (w = 1) needs monotonic=True")
    if not callable(piece.fn):
        raise TypeError(f"its function {piece.fn!r} is not callable")
    parameters = registry.parameters(piece.fn, "logsnr", "w(logsnr, **params)")
    for p in parameters[1:]:
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise TypeError(f"its function takes {p}: name each parameter, with a default")
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"its parameter {p.name!r} needs a default (parameters are bound by keyword)")


# name -> Weighting, with no parameters bound (``build`` binds them). Filled by ``register``.
WEIGHTINGS: registry.Registry[Weighting] = registry.Registry("weighting", check_contract)


def register(name: str, *, monotonic: bool, is_elbo: bool = False, example: dict | None = None):
    """Decorator: register ``w(logsnr, **params)`` as the weighting ``name`` in ``WEIGHTINGS``.

    Args:
        name: the name configs give (``config.loss.weighting``).
        monotonic: w is non-increasing in lambda = log SNR (the objective is then an ELBO of noise-augmented data).
        is_elbo: w = 1 everywhere (the objective is the VLB itself).
        example: the parameters (``{"bias": 1.0}``) its contract checks (``vdm.testing.weighting``) bind;
            ``None``: its defaults.

    Returns:
        A decorator that registers ``Weighting(name, fn, monotonic, is_elbo)`` and returns ``fn`` unchanged.

    Raises:
        vdm.registry.RegistrationError: the name is taken, or the weighting fails ``check_contract``.
    """
    def add(fn: WeightingFn) -> WeightingFn:
        module = fn.__module__ if isinstance(fn, types.FunctionType) else type(fn).__module__
        WEIGHTINGS.register(name, Weighting(name, fn, monotonic, is_elbo), example=example, module=module)
        return fn

    return add


@register("elbo", monotonic=True, is_elbo=True)
def elbo(logsnr):
    """w(lambda) = 1: the variational bound itself (VDM, Kingma et al. 2021)."""
    return jnp.ones_like(logsnr)


@register("sigmoid", monotonic=True)
def sigmoid(logsnr, bias: float = 2.0):
    """w(lambda) = sigmoid(bias - lambda) (Kingma & Gao 2023, Sec. 5).

    Monotonic: close to 1 at high noise (the ELBO there) and decaying like
    exp(bias - lambda) at low noise.
    """
    return jnp.exp(-jnp.logaddexp(0.0, logsnr - bias))


@register("edm", monotonic=False)
def edm(logsnr, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
    """The EDM objective (Karras et al. 2022) as a weighting (Kingma & Gao, App. D.1).

    EDM draws log sigma ~ N(p_mean, p_std^2), i.e. lambda = -2 log sigma ~
    N(-2 p_mean, (2 p_std)^2) = N(2.4, 2.4^2), and weights ||x - x_hat||^2 =
    sigma^2 ||eps - eps_hat||^2 by (sigma^2 + sigma_data^2) / (sigma sigma_data)^2. So the
    EDM loss is the weighted loss with

        w(lambda) = 2 N(lambda; 2.4, 2.4^2) (exp(-lambda) + sigma_data^2) / sigma_data^2

    (Kingma & Gao list it without the constant 2, which only rescales the loss).
    Not monotonic (a bump around lambda ~ 2.4).
    """
    mean, std = -2.0 * p_mean, 2.0 * p_std
    log_normal = -0.5 * ((logsnr - mean) / std) ** 2 - jnp.log(std * math.sqrt(2 * math.pi))
    return 2.0 * jnp.exp(log_normal + jnp.logaddexp(-logsnr, 2 * math.log(sigma_data)) - 2 * math.log(sigma_data))


@functools.lru_cache(maxsize=None)
def _edm_peak(p_mean: float, p_std: float, sigma_data: float) -> tuple[float, float]:
    """(argmax, max) of the EDM weighting over lambda: grid search, then golden section.

    Plain Python floats, so it runs once per parameter set, outside any trace.
    """
    mean, std = -2.0 * p_mean, 2.0 * p_std

    def log_w(lam: float) -> float:  # log of edm() up to its constant
        return -0.5 * ((lam - mean) / std) ** 2 + math.log(math.exp(-lam) + sigma_data**2)

    lo, hi = mean - 12 * std, mean + 12 * std
    grid = [lo + (hi - lo) * i / 6000 for i in range(6001)]
    i = max(range(len(grid)), key=lambda k: log_w(grid[k]))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        if log_w(a) > log_w(b):
            hi = b
        else:
            lo = a
    peak = 0.5 * (lo + hi)
    normaliser = 2.0 / (std * math.sqrt(2 * math.pi) * sigma_data**2)  # edm() = normaliser * exp(log_w)
    return peak, normaliser * math.exp(log_w(peak))


@register("edm_monotonic", monotonic=True)
def edm_monotonic(logsnr, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
    """EDM weighting made monotonic (Kingma & Gao 2023, Sec. 5, "EDM-monotonic").

    Equal to the EDM weighting at lambda above its peak and held at the peak value below
    it, so that w is non-increasing in lambda and the objective is an ELBO of
    noise-augmented data.
    """
    peak, w_max = _edm_peak(p_mean, p_std, sigma_data)
    return jnp.where(logsnr >= peak, edm(logsnr, p_mean, p_std, sigma_data), w_max)


@register("v_mse", monotonic=True)
def v_mse(logsnr):
    """v-prediction MSE with the cosine schedule and uniform t (Salimans & Ho 2022).

    ||v - v_hat||^2 = (1 + exp(-lambda)) ||eps - eps_hat||^2 and the cosine schedule has
    -dt/dlambda = 1 / (2 pi cosh(lambda / 2)), so E_t ||v - v_hat||^2 equals the weighted
    loss with w(lambda) = 2 (1 + exp(-lambda)) (-dt/dlambda) = 2 exp(-lambda / 2) / pi.
    Monotonic (Kingma & Gao, Table 1).
    """
    return 2.0 * jnp.exp(-0.5 * logsnr) / math.pi


@register("eps_mse", monotonic=False)
def eps_mse(logsnr):
    """DDPM's L_simple, E_t ||eps - eps_hat||^2, with the cosine schedule (Ho et al. 2020).

    The cosine schedule has -dt/dlambda = 1 / (2 pi cosh(lambda / 2)), so
    w(lambda) = 2 (-dt/dlambda) = sech(lambda / 2) / pi. Not monotonic.
    """
    return 1.0 / (math.pi * jnp.cosh(0.5 * logsnr))


@register("flow_matching", monotonic=True)
def flow_matching(logsnr):
    """Rectified flow / flow matching with the optimal-transport path (Lipman et al. 2023).

    z_t = (1 - t) x + t eps, target u = eps - x, loss E_t ||u - u_hat||^2. With
    lambda = 2 log((1 - t) / t): ||u - u_hat||^2 = ||eps - eps_hat||^2 / (1 - t)^2 and
    -dt/dlambda = t (1 - t) / 2, so w(lambda) = t / (1 - t) = exp(-lambda / 2).
    Monotonic (Kingma & Gao, Table 1: the same shape as v-MSE with cosine).
    """
    return jnp.exp(-0.5 * logsnr)


@register("min_snr", monotonic=False)
def min_snr(logsnr, snr_gamma: float = 5.0):
    """Min-SNR-gamma weighting (Hang et al. 2023) of L_simple with the cosine schedule.

    The eps-loss is weighted by min(SNR, k) / SNR = min(1, k exp(-lambda)), so
    w(lambda) = sech(lambda / 2) / pi * min(1, k exp(-lambda)). Not monotonic.
    """
    return eps_mse(logsnr) * jnp.minimum(1.0, snr_gamma * jnp.exp(-logsnr))


def build(name: str | Weighting, **params) -> Weighting:
    """The weighting called ``name`` (or the given ``Weighting``) with ``params`` bound (e.g. ``bias`` for sigmoid).

    Args:
        name: a name in ``WEIGHTINGS``, or a ``Weighting`` (returned as it is when no ``params`` are given).
        **params: values for the weighting's parameters (those after ``logsnr``); the others keep their defaults.

    Returns:
        The ``Weighting``, callable on log-SNR values of any shape.

    Raises:
        ValueError: an unknown name (naming the valid ones), or a parameter the weighting does not take.
    """
    if isinstance(name, Weighting) and not params:
        return name
    template = name if isinstance(name, Weighting) else WEIGHTINGS.lookup(name)
    accepted = [p for p in inspect.signature(template.fn).parameters if p != "logsnr"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"weighting {template.name!r} takes parameters {accepted or 'none'}, not {', '.join(unknown)}"
        )
    return dataclasses.replace(template, params=tuple(sorted((dict(template.params) | params).items())))
