"""How the noise level of each example is drawn.

Two layers, each small:

1. **Uniform samplers** ``(rng, batch_size) -> u`` with u in [0, 1), marginally uniform:

   - ``iid``: independent uniforms.
   - ``low_discrepancy``: VDM's sampler (Kingma et al. 2021, App. I.1):
     ``u_i = mod(u_0 + i / B, 1)`` with one shared ``u_0 ~ U(0, 1)``. Each u_i is
     still uniform, so every per-example loss stays unbiased, but the batch covers
     [0, 1) evenly and the batch mean has lower variance.

   With a noise schedule, t = u and gamma = gamma(t).

2. **Densities over log-SNR** for importance sampling (Kingma & Gao 2023, Sec. 3 and
   App. F): lambda = F^{-1}(u) for a density p(lambda) on [lambda_min, lambda_max], and
   the example gets weight w(lambda) / p(lambda) in place of w(lambda) (-dlambda/dt).
   Both estimate the same integral  0.5 * int w(lambda) E||eps - eps_hat||^2 dlambda.
   Densities are piecewise constant on a grid, so sampling is an exact inverse CDF:

   - ``weighting_density(w, lo, hi)``: p proportional to w (then w / p is nearly constant). The trainer
     passes w times its parameterisation's error scale b^2 (``vdm.objective.Objective.initial_density``), so
     that the network's own squared error, not the eps error, gets the constant weight.
   - ``AdaptiveDensity``: p proportional to an EMA, per lambda bin, of the observed |f|, the
     integrand f = 0.5 w(lambda) ||eps - eps_hat||^2: p ~ E[|f| | lambda] (Kingma & Gao's choice),
     mixed with a little uniform mass so p > 0 everywhere and the weights stay bounded.
     That is not the variance-minimising density: f is noisy at a given lambda (eps, the data),
     and the variance of f / p is smallest for p proportional to sqrt(E[f^2 | lambda]), which is
     proportional to E[|f| | lambda] only when the ratio of the two is the same at every lambda
     (as when f is deterministic given lambda).

3. **The noise level and its rate** (``noise_levels``): u becomes gamma and the rate d gamma / du that
   the bound's estimator weighs each example by (``vdm.diffusion``'s conventions): gamma'(t) in continuous
   time, T expm1(gamma_t - gamma_s) with T steps, 1 / p(lambda) through a density.

Densities are pytrees (``flax.struct.dataclass``), so they live in the training state,
pass through ``jit`` and are checkpointed with it.

The samplers and densities are registries, ``TIME_SAMPLERS`` (a function ``(rng, batch_size) -> u``) and
``DENSITIES`` (a builder ``(weighting, logsnr_min, logsnr_max, num_bins=..., **kw) -> density`` whose result
has ``sample(u) -> (lambda, log p)`` and ``log_prob(lambda)``); a new one is a function decorated with
``TIME_SAMPLERS.register(name)`` or ``DENSITIES.register(name)``.
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from vdm import registry


def _takes(*args):
    """A registry's contract: the piece is callable with these positional arguments (its signature binds them)."""
    def contract(name: str, piece) -> None:
        if not callable(piece):
            raise TypeError(f"{piece!r} is not callable")
        try:
            inspect.signature(piece).bind(*args)
        except TypeError:
            raise TypeError(f"it must be callable as ({', '.join(args)})") from None
        except ValueError:
            raise TypeError(f"the signature of {piece!r} cannot be read") from None

    return contract


# name -> (rng, batch_size) -> u in [0, 1), marginally uniform
TIME_SAMPLERS: registry.Registry[Callable] = registry.Registry("time sampler", _takes("rng", "batch_size"))
# name -> builder(weighting, logsnr_min, logsnr_max, num_bins=..., **kw) -> a density over log-SNR
DENSITIES: registry.Registry[Callable] = registry.Registry(
    "log-SNR density", _takes("weighting", "logsnr_min", "logsnr_max"))

# --------------------------------------------------------------------------------------
# Uniform samplers: (rng, batch_size) -> u in [0, 1)
# --------------------------------------------------------------------------------------


@TIME_SAMPLERS.register("iid")
def iid(rng: jax.Array, batch_size: int) -> jax.Array:
    """u_i ~ U(0, 1) independently."""
    return jax.random.uniform(rng, (batch_size,))


@TIME_SAMPLERS.register("low_discrepancy")
def low_discrepancy(rng: jax.Array, batch_size: int) -> jax.Array:
    """u_i = mod(u_0 + i / B, 1), u_0 ~ U(0, 1) (VDM, Kingma et al. 2021, App. I.1)."""
    u0 = jax.random.uniform(rng, ())
    return jnp.mod(u0 + jnp.arange(batch_size) / batch_size, 1.0)


def build(name: str):
    """The uniform sampler called ``name``.

    Args:
        name: a name in ``TIME_SAMPLERS``.

    Returns:
        ``sampler(rng, batch_size) -> u`` [batch_size], float32 in [0, 1).

    Raises:
        ValueError: an unknown name (naming the valid ones).
    """
    return TIME_SAMPLERS.lookup(name)


# --------------------------------------------------------------------------------------
# Piecewise-constant densities over log-SNR
# --------------------------------------------------------------------------------------


def _inverse_cdf(edges, mass, u):
    """lambda = F^{-1}(u) and log p(lambda) for bin masses ``mass`` on ``edges``."""
    cdf = jnp.concatenate([jnp.zeros(1), jnp.cumsum(mass)])
    cdf = cdf / cdf[-1]
    k = jnp.clip(jnp.searchsorted(cdf, u, side="right") - 1, 0, mass.shape[0] - 1)
    width = edges[1:] - edges[:-1]
    frac = jnp.clip((u - cdf[k]) / mass[k], 0.0, 1.0)
    logsnr = edges[k] + frac * width[k]
    return logsnr, jnp.log(mass[k] / width[k])


def _bin_index(edges, logsnr):
    return jnp.clip(jnp.searchsorted(edges, logsnr, side="right") - 1, 0, edges.shape[0] - 2)


@struct.dataclass
class GridDensity:
    """A density over log-SNR, constant on each bin ``[edges[k], edges[k+1])``.

    ``mass[k]`` is the probability of bin k (they sum to one).
    """

    edges: jax.Array  # [K + 1], increasing
    mass: jax.Array  # [K]

    def sample(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(lambda, log p(lambda)) for uniforms u, by the exact inverse CDF."""
        logsnr, log_p = _inverse_cdf(self.edges, self.mass, u)
        return jax.lax.stop_gradient(logsnr), jax.lax.stop_gradient(log_p)

    def log_prob(self, logsnr: jax.Array) -> jax.Array:
        k = _bin_index(self.edges, logsnr)
        return jnp.log(self.mass[k] / (self.edges[k + 1] - self.edges[k]))


@DENSITIES.register("weighting")
def weighting_density(weighting, logsnr_min: float, logsnr_max: float, num_bins: int = 128) -> GridDensity:
    """p(lambda) proportional to w(lambda) on [logsnr_min, logsnr_max] (midpoint rule per bin).

    With this p the importance weight w / p is almost constant, so the estimator's
    variance comes only from the per-example error, not from the weighting's shape.
    """
    edges = jnp.linspace(logsnr_min, logsnr_max, num_bins + 1)
    mid = 0.5 * (edges[1:] + edges[:-1])
    mass = weighting(mid) * (edges[1:] - edges[:-1])
    return GridDensity(edges=edges, mass=mass / jnp.sum(mass))


@struct.dataclass
class AdaptiveDensity:
    """The adaptive noise density of Kingma & Gao (2023, App. F).

    Keeps ``ema[k]``, an exponential moving average over training steps of the mean of
    |0.5 w(lambda) ||eps - eps_hat||^2| over the examples whose lambda fell in bin k
    (the integrand of the weighted loss: p ~ E[|f| | lambda], not the variance-minimising
    sqrt(E[f^2 | lambda]); see the module docstring), and samples

        p = (1 - uniform_mix) * (ema * width / sum) + uniform_mix * (width / range)

    by inverse CDF. The uniform part keeps every weight w / p bounded, so the estimate
    is unbiased whatever the EMA holds. Feed it with ``update`` after each step.
    """

    edges: jax.Array  # [K + 1]
    ema: jax.Array  # [K]
    decay: float = struct.field(pytree_node=False, default=0.99)
    uniform_mix: float = struct.field(pytree_node=False, default=0.05)

    @classmethod
    def create(cls, weighting, logsnr_min: float, logsnr_max: float, num_bins: int = 100,
               decay: float = 0.99, uniform_mix: float = 0.05) -> "AdaptiveDensity":
        """Start as p proportional to w(lambda) and adapt from there."""
        if not 0.0 < uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix must be in (0, 1], got {uniform_mix}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        edges = jnp.linspace(logsnr_min, logsnr_max, num_bins + 1)
        ema = weighting(0.5 * (edges[1:] + edges[:-1]))
        return cls(edges=edges, ema=ema / jnp.mean(ema), decay=decay, uniform_mix=uniform_mix)

    @property
    def mass(self) -> jax.Array:
        width = self.edges[1:] - self.edges[:-1]
        adaptive = self.ema * width
        adaptive = adaptive / jnp.sum(adaptive)
        return (1.0 - self.uniform_mix) * adaptive + self.uniform_mix * width / jnp.sum(width)

    def sample(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        return GridDensity(self.edges, self.mass).sample(u)

    def log_prob(self, logsnr: jax.Array) -> jax.Array:
        return GridDensity(self.edges, self.mass).log_prob(logsnr)

    def update(self, logsnr: jax.Array, integrand: jax.Array) -> "AdaptiveDensity":
        """Fold one batch of (lambda_i, integrand_i) into the per-bin EMA."""
        logsnr = jax.lax.stop_gradient(logsnr)
        integrand = jnp.abs(jax.lax.stop_gradient(integrand))
        k = _bin_index(self.edges, logsnr)
        sums = jnp.zeros_like(self.ema).at[k].add(integrand)
        counts = jnp.zeros_like(self.ema).at[k].add(1.0)
        batch_mean = sums / jnp.maximum(counts, 1.0)
        ema = jnp.where(counts > 0, self.decay * self.ema + (1.0 - self.decay) * batch_mean, self.ema)
        return self.replace(ema=ema)


DENSITIES.register("adaptive", AdaptiveDensity.create)


def build_density(name: str, weighting, logsnr_min: float, logsnr_max: float, **kw):
    """The log-SNR density called ``name`` on [logsnr_min, logsnr_max].

    Args:
        name: a name in ``DENSITIES``.
        weighting: w(lambda), the density's starting shape.
        logsnr_min, logsnr_max: its support, logsnr_min < logsnr_max.
        **kw: the builder's options (``num_bins``, and ``decay``, ``uniform_mix`` of ``adaptive``).

    Returns:
        The density (``GridDensity`` or ``AdaptiveDensity``).

    Raises:
        ValueError: an unknown name, or an empty range.
    """
    builder = DENSITIES.lookup(name)
    if not logsnr_min < logsnr_max:
        raise ValueError(f"log-SNR density needs logsnr_min < logsnr_max, got {logsnr_min}, {logsnr_max}")
    return builder(weighting, logsnr_min, logsnr_max, **kw)


# --------------------------------------------------------------------------------------
# The noise level and its rate
# --------------------------------------------------------------------------------------


class NoiseLevels(NamedTuple):
    """The noise level drawn for each example, and its rate d gamma / du (``vdm.diffusion``'s conventions)."""

    gamma: jax.Array  # gamma_t: [B] or per element
    rate: jax.Array  # gamma'(t); T expm1(gamma_t - gamma_s); or 1 / p(lambda): the shape of gamma


def check_noise_levels(*, num_steps: int = 0, importance_sampling: bool = False) -> None:
    """Check that the way of drawing noise levels is one of the bound's: T steps draw t on a grid,
    importance sampling draws lambda from a density, and the two do not combine.

    Raises:
        ValueError: ``num_steps`` < 0, or T steps with importance sampling.
    """
    if num_steps < 0:
        raise ValueError(f"num_steps={num_steps}: must be >= 0 (0 = continuous time)")
    if num_steps and importance_sampling:
        raise ValueError("importance sampling of the noise level is for continuous time (num_steps=0)")


def noise_levels(u: jax.Array, gamma_fn: Callable, *, num_steps: int = 0, logsnr_density=None) -> NoiseLevels:
    """Map uniforms u [B] to the noise levels of the bound's estimator:

    - continuous time (``num_steps=0``): t = u, gamma = gamma(t), rate = gamma'(t) (``jax.jvp``);
    - T steps (``num_steps=T``): i = floor(u T) + 1, t = i / T, s = t - 1 / T,
      rate = T expm1(gamma_t - gamma_s);
    - importance sampling (``logsnr_density`` given): lambda = F^{-1}(u), gamma = -lambda,
      rate = 1 / p(lambda) (one log-SNR per example: the schedule is not used).

    Args:
        u: uniforms [B] (``TIME_SAMPLERS``).
        gamma_fn: the schedule t [B] -> gamma [B] or [B, ...] (unused with a density).
        num_steps: 0 (continuous time) or T.
        logsnr_density: a density over lambda (``GridDensity``, ``AdaptiveDensity``), or None.

    Returns:
        ``NoiseLevels(gamma, rate)``, both of gamma's shape.

    Raises:
        ValueError: see ``check_noise_levels``.
    """
    check_noise_levels(num_steps=num_steps, importance_sampling=logsnr_density is not None)
    if logsnr_density is not None:
        logsnr, log_p = logsnr_density.sample(u)
        return NoiseLevels(-logsnr, jnp.exp(-log_p))
    if num_steps:
        t = (jnp.floor(u * num_steps) + 1.0) / num_steps
        t = jnp.minimum(t, 1.0)
        gamma_t = gamma_fn(t)
        gamma_s = gamma_fn(t - 1.0 / num_steps)
        return NoiseLevels(gamma_t, num_steps * jnp.expm1(gamma_t - gamma_s))
    return NoiseLevels(*jax.jvp(gamma_fn, (u,), (jnp.ones_like(u),)))
