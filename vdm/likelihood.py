"""The likelihood by the probability-flow ODE, beside the VLB.

The probability-flow ODE of ``vdm.samplers`` (over t, per element i:
F_i = gamma_i'(t) (sigma_i eps_hat_i - sigma_i^2 z_i) / 2) is a continuous normalising flow from z(0) to
z(1); by the instantaneous change of variables (Chen et al. 2018; Song et al. 2021, App. D.2)

    log p_0(f) = log N(z(1); 0, I) + integral_0^1 div_z F(t, z(t)) dt,
    div_z F    = sum_i gamma_i'(t) (sigma_i d eps_hat_i / d z_i - sigma_i^2) / 2,

integrated from z(0) = f upwards with diffrax. Over t, a schedule whose gamma differs per element
works as a scalar one does. The divergence is exact (one ``jax.jvp``
per dimension: small d only) or Hutchinson's estimate eps^T (dF/dz) eps with one fixed
Rademacher probe per solve (FFJORD, Grathwohl et al. 2019), unbiased, averaged over
``num_probes`` solves.

That is a density of continuous f. For the discrete data x (V levels per dimension, bins of
width 2 / V in f), a dequantisation q(u | x) on the bin gives the bound

    -log P(x) <= E_q[ -log p_0(f(x, u)) + log q(u | x) ]                                     (1)

and with K samples the importance-weighted bound -log (1/K sum_k p_0(f_k) / q(u_k | x)),
tighter as K grows. ``uniform``: q uniform on the bin (log q = d log(V / 2)), the standard
in ScoreFlow (Song et al. 2021) and Flow++. ``truncated_normal``: q = N(centre, s^2) truncated
to the bin in each dimension with s = sigma_0 / alpha_0 = exp(gamma_0 / 2), the model's own
noise at t = 0 (after i-DODE, Zheng et al. 2023), which puts the dequantised points where the
model has seen data.

The estimators and dequantisations are registries, ``DIVERGENCES`` (a ``Divergence`` record) and
``DEQUANTIZATIONS`` (a function ``(rng, x, vocab_size, gamma_0) -> (offset, log q)``); a new one is
``DIVERGENCES.register(name, Divergence(probe, estimate))`` or a function decorated with
``@DEQUANTIZATIONS.register(name)``. The options (``config.eval.ode``) are checked in one place,
:func:`check_options`.
"""
from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Mapping
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.stats import norm

from vdm import diffusion, options, registry, samplers


class OdeLikelihood(NamedTuple):
    log_prob: jax.Array  # [B] nats: log p_0 at the given points
    nfe: jax.Array  # int32: network evaluations of the solve (each also costs a jvp)


class Divergence(NamedTuple):
    """A divergence estimator for a batched fn: [B, ...] -> [B, ...]. ``probe(key, f)`` draws its
    randomness once per solve (or returns None); ``estimate(fn, z, probe)`` -> (fn(z), div fn at z [B])."""

    probe: Callable
    estimate: Callable


def _divergence_contract(name: str, piece) -> None:
    """A divergence is a ``Divergence`` of two callables (TypeError if not)."""
    if not (isinstance(piece, Divergence) and callable(piece.probe) and callable(piece.estimate)):
        raise TypeError(f"a divergence is a vdm.likelihood.Divergence(probe, estimate) of two callables, not {piece!r}")


def _dequantization_contract(name: str, piece) -> None:
    """A dequantisation is callable as ``(rng, x, vocab_size, gamma_0)`` (TypeError if not)."""
    try:
        inspect.signature(piece).bind(None, None, None, None)
    except (TypeError, ValueError):
        raise TypeError("a dequantization is a function (rng, x, vocab_size, gamma_0) -> (offset, log q)") from None


# name -> Divergence
DIVERGENCES: registry.Registry[Divergence] = registry.Registry("divergence", _divergence_contract)
# name -> (rng, x, vocab_size, gamma_0) -> (offset from the bin's centre, log q per example)
DEQUANTIZATIONS: registry.Registry[Callable] = registry.Registry("dequantization", _dequantization_contract)


def _rademacher_probe(key: jax.Array, f: jax.Array) -> jax.Array:
    return jax.random.rademacher(key, f.shape, f.dtype)


def _no_probe(key: jax.Array, f: jax.Array) -> None:
    return None


def _hutchinson_divergence(fn: Callable, z: jax.Array, probe: jax.Array):
    """Hutchinson's estimate probe^T (dfn/dz) probe: one jvp."""
    out, jv = jax.jvp(fn, (z,), (probe,))
    return out, jnp.sum(jnp.reshape(probe * jv, (z.shape[0], -1)), axis=-1)


def _exact_divergence(fn: Callable, z: jax.Array, probe: None):
    """The trace of dfn/dz, one jvp per dimension."""
    dims = math.prod(z.shape[1:])
    basis = jnp.eye(dims, dtype=z.dtype).reshape((dims, 1) + z.shape[1:])

    def column(e):
        _, jv = jax.jvp(fn, (z,), (jnp.broadcast_to(e, z.shape),))
        return jnp.sum(jnp.reshape(jv * e, (z.shape[0], -1)), axis=-1)

    return fn(z), jnp.sum(jax.lax.map(column, basis), axis=0)


DIVERGENCES.register("hutchinson", Divergence(_rademacher_probe, _hutchinson_divergence))
DIVERGENCES.register("exact", Divergence(_no_probe, _exact_divergence))


def ode_log_likelihood(rng: jax.Array, f: jax.Array, gamma_fn: Callable, eps_fn: Callable, *, cond=None,
                       rtol: float = 1e-5, atol: float = 1e-5, divergence: str = "hutchinson", num_probes: int = 1,
                       solver: str = "tsit5", max_steps: int = 4096,
                       on_time: Callable[[jax.Array], None] | None = None) -> OdeLikelihood:
    """log p_0(f) per example [B] under the model's probability-flow ODE (see the module's formula).

    ``on_time``: called on the host with the solver's t after each step it takes (``samplers.solve_ode``), for
    progress inside one long solve; the solves (``num_probes``) run one after another, each from t = 0 to 1."""
    check_options(dict(rtol=rtol, atol=atol, divergence=divergence, num_probes=num_probes, solver=solver,
                       max_steps=max_steps))
    estimator = DIVERGENCES.lookup(divergence)
    batch = f.shape[0]
    drift = samplers.pf_ode_drift(eps_fn, gamma_fn, cond)
    dims = math.prod(f.shape[1:])

    def one_solve(key):
        probe = estimator.probe(key, f)

        def field(t, state):
            z, _ = state
            dz, div = estimator.estimate(lambda y: drift(t, y), z, probe)
            return dz, div

        (z1, integral), nfe = samplers.solve_ode(field, (f, jnp.zeros((batch,), f.dtype)), 0.0, 1.0, rtol=rtol,
                                                 atol=atol, solver=solver, max_steps=max_steps, on_progress=on_time)
        prior = -0.5 * jnp.sum(jnp.reshape(z1 * z1, (batch, -1)), axis=-1) - 0.5 * dims * math.log(2 * math.pi)
        return prior + integral, nfe

    log_probs, nfes = jax.lax.map(one_solve, jax.random.split(rng, num_probes))
    return OdeLikelihood(jnp.mean(log_probs, axis=0), jnp.sum(nfes).astype(jnp.int32))


def dequantize(rng: jax.Array, x: jax.Array, vocab_size: int, method: str = "uniform",
               gamma_0: float | jax.Array = 0.0) -> tuple[jax.Array, jax.Array]:
    """(f, log q) for one draw: continuous points f in the bins of x (in ``diffusion.encode``'s
    units, bins of width 2 / V) and their dequantisation log-density per example [B], in f units."""
    offset, log_q = DEQUANTIZATIONS.lookup(method)(rng, x, vocab_size, gamma_0)
    return diffusion.encode(x, vocab_size) + offset, log_q


@DEQUANTIZATIONS.register("uniform")
def _uniform(rng: jax.Array, x: jax.Array, vocab_size: int, gamma_0) -> tuple[jax.Array, jax.Array]:
    """q uniform on the bin: (offset from the bin's centre, log q = d log(V / 2) per example)."""
    half = 1.0 / vocab_size
    dims = math.prod(x.shape[1:])
    offset = jax.random.uniform(rng, x.shape, minval=-half, maxval=half)
    log_q = jnp.full((x.shape[0],), dims * math.log(vocab_size / 2.0))
    return offset, log_q


@DEQUANTIZATIONS.register("truncated_normal")
def _truncated_normal(rng: jax.Array, x: jax.Array, vocab_size: int, gamma_0) -> tuple[jax.Array, jax.Array]:
    """q = N(centre, s^2) truncated to the bin, s = exp(gamma_0 / 2): (offset from the centre, log q per example)."""
    half = 1.0 / vocab_size
    scale = jnp.exp(0.5 * jnp.asarray(gamma_0, jnp.float32))
    offset = scale * jax.random.truncated_normal(rng, -half / scale, half / scale, x.shape)
    mass = norm.cdf(half / scale) - norm.cdf(-half / scale)
    log_q = norm.logpdf(offset / scale) - jnp.log(scale) - jnp.log(mass)
    return offset, jnp.sum(jnp.reshape(log_q, (x.shape[0], -1)), axis=-1)


def discrete_nll(rng: jax.Array, x: jax.Array, vocab_size: int, log_density: Callable, *,
                 dequantization: str = "uniform", num_samples: int = 1, gamma_0=0.0) -> tuple[jax.Array, jax.Array]:
    """(upper bound (1) on -log P(x) in nats per example [B], network evaluations), importance-
    weighted over ``num_samples`` dequantisations.

    ``log_density(rng, f) -> (log p_0 [B], nfe)`` is the density of continuous points (e.g.
    ``ode_log_likelihood``); the evaluations of all samples are summed.
    """
    check_options(dict(dequantization=dequantization, num_samples=num_samples))

    def one(key):
        k_dequant, k_density = jax.random.split(key)
        f, log_q = dequantize(k_dequant, x, vocab_size, dequantization, gamma_0)
        log_p, nfe = log_density(k_density, f)
        return log_p - log_q, jnp.asarray(nfe, jnp.int32)

    log_weights, nfes = jax.lax.map(one, jax.random.split(rng, num_samples))  # [K, B], [K]
    return -(jax.nn.logsumexp(log_weights, axis=0) - math.log(num_samples)), jnp.sum(nfes)


# Option name -> check(name, value): the options of ``config.eval.ode`` (and ``max_steps``).
OPTIONS = types.MappingProxyType({
    "rtol": options.positive,
    "atol": options.positive,
    "solver": functools.partial(options.choice, table=samplers.SOLVERS),
    "divergence": functools.partial(options.choice, table=DIVERGENCES),
    "num_probes": options.positive_int,
    "max_steps": options.positive_int,
    "dequantization": functools.partial(options.choice, table=DEQUANTIZATIONS),
    "num_samples": options.positive_int,
})


def check_options(kwargs: Mapping) -> None:
    """Check the ODE likelihood's options (``config.eval.ode``): type, finiteness and range of each.

    Raises ``vdm.options.OptionError`` naming the option; ``ode_log_likelihood`` and ``discrete_nll``
    check their own, and ``vdm.configlib.validate`` asks it before anything is compiled.
    """
    options.check_all(OPTIONS, kwargs)
