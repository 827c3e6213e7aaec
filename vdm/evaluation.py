"""The bounds reported on test data: the VLB and the probability-flow ODE's, as registry entries.

An evaluation method is ``method(model, batch, rng, settings) -> Evaluated`` (``EVALUATIONS``, chosen
by ``config.eval.method``; ``settings`` is the config's ``eval`` section as a dict). It returns values
in nats, keyed by the name under which their bits/dim are reported, so the trainer sums, averages
and converts them without naming any:

- ``bounds``: per-example upper bounds on -log p(x) [B] (a standard error is reported for each);
- ``parts``: per-example parts of a bound [B] (the VLB's terms);
- ``counts``: scalars that are not nats (the ODE solver's network evaluations).

For a class-conditional model the bounds are on -log p(x | y).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from vdm import diffusion, likelihood, objective, registry
from vdm.model import VDM, pure_functions
from vdm.nets import layers


class Evaluated(NamedTuple):
    bounds: dict[str, jax.Array]
    parts: dict[str, jax.Array]
    counts: dict[str, jax.Array]


def vlb_bound(model: VDM, batch: dict, rng: jax.Array, *, num_steps: int = 0) -> diffusion.Bound:
    """The true VLB per example (``vdm.objective.EVALUATION``: no dropout or label dropout, the elbo
    weighting whatever was trained, iid t), with T = ``num_steps`` steps (0: continuous time)."""
    obj = dataclasses.replace(objective.EVALUATION, num_steps=num_steps)
    return objective.estimate(model, batch, objective.draw(rng, batch["image"].shape[0], obj), obj, train=False)


def ode_nll(model: VDM, batch: dict, rng: jax.Array, *, rtol: float = 1e-5, atol: float = 1e-5,
            divergence: str = "hutchinson", num_probes: int = 1, dequantization: str = "uniform",
            num_samples: int = 1, solver: str = "tsit5") -> tuple[jax.Array, jax.Array]:
    """(-log P(x) in nats per example [B], network evaluations): the probability-flow ODE's
    density dequantised to the discrete data (``vdm.likelihood``), conditional on the label
    for a conditional model (no guidance)."""
    cond = model.condition(batch)
    eps_fn, gamma_fn = pure_functions(model)

    def log_density(key, f):
        result = likelihood.ode_log_likelihood(key, f, gamma_fn, eps_fn, cond=cond, rtol=rtol, atol=atol,
                                               divergence=divergence, num_probes=num_probes, solver=solver)
        return result.log_prob, result.nfe

    with layers.plain_convolutions():  # the divergence differentiates the network in forward mode
        return likelihood.discrete_nll(rng, batch["image"], model.vocab_size, log_density,
                                       dequantization=dequantization, num_samples=num_samples,
                                       gamma_0=diffusion.schedule_endpoints(model.schedule)[0])


def vlb(model: VDM, batch: dict, rng: jax.Array, settings: dict) -> Evaluated:
    """``bpd``: the VLB (``vlb_bound``, ``settings["num_steps"]`` steps), and its terms as ``bpd_<term>``."""
    b = vlb_bound(model, batch, jax.random.fold_in(rng, 0), num_steps=int(settings.get("num_steps", 0)))
    return Evaluated({"bpd": b.total}, {f"bpd_{name}": v for name, v in b.terms().items()}, {})


def ode(model: VDM, batch: dict, rng: jax.Array, settings: dict) -> Evaluated:
    """``bpd_ode``: the probability-flow ODE's dequantised bound (``ode_nll`` with ``settings["ode"]``), and
    ``ode_nfe``, the solver's network evaluations."""
    nll, nfe = ode_nll(model, batch, jax.random.fold_in(rng, 1), **dict(settings.get("ode", {})))
    return Evaluated({"bpd_ode": nll}, {}, {"ode_nfe": nfe.astype(jnp.float32)})


def both(model: VDM, batch: dict, rng: jax.Array, settings: dict) -> Evaluated:
    """``vlb`` and ``ode`` on the same images."""
    a, b = vlb(model, batch, rng, settings), ode(model, batch, rng, settings)
    return Evaluated(a.bounds | b.bounds, a.parts | b.parts, a.counts | b.counts)


EVALUATIONS: dict[str, Callable[..., Evaluated]] = {
    "vlb": vlb,
    "ode": ode,
    "both": both,
}


def build(name: str) -> Callable[..., Evaluated]:
    """The evaluation method called ``name``."""
    return registry.lookup(EVALUATIONS, name, "evaluation method")
