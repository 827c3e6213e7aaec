"""The bounds reported on test data: the methods (the VLB, the probability-flow ODE's), the compiled
eval step, and one pass of it over the test split.

An evaluation method is ``method(model, batch, rng, settings) -> Evaluated`` (``EVALUATIONS``, chosen
by ``config.eval.method``; ``settings`` is the config's ``eval`` section as a dict, and ``on_time``, a
host callback for the progress of an ODE solve: ``SolveProgress``). It returns values
in nats, keyed by the name under which their bits/dim are reported, so the trainer sums, averages
and converts them without naming any:

- ``bounds``: per-example upper bounds on -log p(x) [B] (a standard error is reported for each);
- ``parts``: per-example parts of a bound [B] (the VLB's terms);
- ``counts``: scalars that are not nats (the ODE solver's network evaluations).

For a class-conditional model the bounds are on -log p(x | y).

``make_eval_step`` gives, per padded batch, masked sums of the method's values in bits/dim;
``evaluate`` runs it over the test split (``config.eval.batch_size`` images at a time, the same
randomness for every model: a function of ``config.seed`` and the batch) and returns the means
with their standard errors over the images.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdm import (data as data_lib, diffusion, latent, likelihood, metrics as metrics_lib, objective, parallel, registry,
                 samplers)
from vdm.model import VDM, pure_functions


class Evaluated(NamedTuple):
    bounds: dict[str, jax.Array]
    parts: dict[str, jax.Array]
    counts: dict[str, jax.Array]


def vlb_bound(model: VDM, batch: dict, rng: jax.Array, *, num_steps: int = 0, time_sampler: str = "iid"
              ) -> diffusion.Bound:
    """The true VLB per example (``vdm.objective.EVALUATION``: no dropout or label dropout, the elbo
    weighting whatever was trained, iid t), with T = ``num_steps`` steps (0: continuous time).
    ``time_sampler="low_discrepancy"`` spreads the batch's times evenly (``vdm.image_bpd``'s copies of an image)."""
    obj = dataclasses.replace(objective.EVALUATION, num_steps=num_steps, time_sampler=time_sampler)
    return objective.estimate(model, batch, objective.draw_for_step(rng, batch["image"].shape[0], obj), obj, train=False)


def ode_nll(model: VDM, batch: dict, rng: jax.Array, *, rtol: float = 1e-5, atol: float = 1e-5,
            divergence: str = "hutchinson", num_probes: int = 1, dequantization: str = "uniform",
            num_samples: int = 1, solver: str = "tsit5", max_steps: int = 4096,
            on_time: Callable[[jax.Array], None] | None = None) -> tuple[jax.Array, jax.Array]:
    """(-log P(x) in nats per example [B], network evaluations): the probability-flow ODE's
    density dequantised to the discrete data (``vdm.likelihood``), conditional on the label
    for a conditional model (no guidance). ``on_time``: see ``likelihood.ode_log_likelihood``.

    A model with an auxiliary latent (MuLAN, ``vdm.latent``): c ~ q(c | x), one per image, and the result is
    KL(q(c | x) || N(0, I)) + (the ODE's dequantised -log P(x | c)), an upper bound on -log P(x) in expectation
    over c, as the VLB is (``vdm.latent``'s docstring)."""
    cond, latent_kl = model.with_latent(batch["image"], jax.random.fold_in(rng, latent.STREAM), model.condition(batch))
    eps_fn, gamma_fn = pure_functions(model, cond=cond)

    def log_density(key, f):
        result = likelihood.ode_log_likelihood(key, f, gamma_fn, eps_fn, cond=cond, rtol=rtol, atol=atol,
                                               divergence=divergence, num_probes=num_probes, solver=solver,
                                               max_steps=max_steps, on_time=on_time)
        return result.log_prob, result.nfe

    nll, nfe = likelihood.discrete_nll(rng, batch["image"], model.vocab_size, log_density,
                                       dequantization=dequantization, num_samples=num_samples,
                                       gamma_0=diffusion.schedule_endpoints(model.schedule)[0])
    return (nll if latent_kl is None else nll + latent_kl), nfe


# name (config.eval.method) -> method(model, batch, rng, settings) -> Evaluated; a new method is a function
# decorated with @EVALUATIONS.register(name)
EVALUATIONS: registry.Registry[Callable[..., Evaluated]] = registry.Registry("evaluation method")


@EVALUATIONS.register("vlb")
def vlb(model: VDM, batch: dict, rng: jax.Array, settings: dict) -> Evaluated:
    """``bpd``: the VLB (``vlb_bound``, ``settings["timesteps"]`` steps), and its terms as ``bpd_<term>``; for a
    model with an auxiliary latent also ``bpd_latent``, the part of ``bpd_prior`` that is the latent's KL."""
    b = vlb_bound(model, batch, jax.random.fold_in(rng, 0), num_steps=int(settings.get("timesteps", 0)),
                  time_sampler=settings.get("time_sampler", "iid"))
    latent_part = {} if b.latent is None else {"bpd_latent": b.latent}
    return Evaluated({"bpd": b.total}, {f"bpd_{name}": v for name, v in b.terms().items()} | latent_part, {})


@EVALUATIONS.register("ode")
def ode(model: VDM, batch: dict, rng: jax.Array, settings: dict) -> Evaluated:
    """``bpd_ode``: the probability-flow ODE's dequantised bound (``ode_nll`` with ``settings["ode"]``), and
    ``ode_nfe``, the solver's network evaluations."""
    nll, nfe = ode_nll(model, batch, jax.random.fold_in(rng, 1), **dict(settings.get("ode", {})),
                       on_time=settings.get("on_time"))
    return Evaluated({"bpd_ode": nll}, {}, {"ode_nfe": nfe.astype(jnp.float32)})


@EVALUATIONS.register("both")
def both(model: VDM, batch: dict, rng: jax.Array, settings: dict) -> Evaluated:
    """``vlb`` and ``ode`` on the same images."""
    a, b = vlb(model, batch, rng, settings), ode(model, batch, rng, settings)
    return Evaluated(a.bounds | b.bounds, a.parts | b.parts, a.counts | b.counts)


def build(name: str) -> Callable[..., Evaluated]:
    """The evaluation method called ``name``."""
    return registry.lookup(EVALUATIONS, name, "evaluation method")


# --------------------------------------------------------------------------------------
# The compiled step and the pass over the test split
# --------------------------------------------------------------------------------------


class SolveProgress:
    """The progress of the ODE solves inside one batch, from the solver's t (``on_time``: a host callback after
    each step the solver takes, ``samplers.solve_ode``): t rises within a solve, and the next solve starts
    again near 0. ``listener(solves_done, t)`` is told of each new t while it is set (``evaluate`` sets it)."""

    def __init__(self):
        self.listener: Callable[[int, float], None] | None = None
        self._solves, self._t = 0, 0.0

    def start_batch(self) -> None:
        self._solves, self._t = 0, 0.0

    def __call__(self, t) -> None:
        t = float(t)
        if t < self._t - 0.5:  # back near the start: the next solve (several devices' calls differ by a step)
            self._solves += 1
        self._t = t
        if self.listener is not None:
            self.listener(self._solves, t)


class _SolveLines:
    """A ``SolveProgress`` listener that logs ``batch i/n: ODE solve k/K at t = 0.42`` on ``progress``."""

    def __init__(self, progress, num_batches: int, config):
        ode = config.eval.ode
        self.progress, self.num_batches, self.batch, self.last = progress, num_batches, 0, time.monotonic()
        self.solves = int(ode.get("num_samples", 1)) * int(ode.get("num_probes", 1))

    def __call__(self, solves_done: int, t: float) -> None:
        now = time.monotonic()
        if now - self.last >= SOLVE_LOG_SECONDS:
            self.last = now
            self.progress.log(f"batch {self.batch + 1}/{self.num_batches}: ODE solve "
                              f"{min(solves_done + 1, self.solves)}/{self.solves} at t = {t:.3f}")


# How often a long ODE solve inside an evaluation batch says where it is (with show_progress).
SOLVE_LOG_SECONDS = 10.0


def make_eval_step(graphdef, config, solve_progress: SolveProgress | None = None, time_sampler: str = "iid"):
    """(sums, counts, values) of one padded batch for ``config.eval.method`` (``EVALUATIONS``): masked sums
    of the per-example bits/dim of its bounds and their parts (and ``count``), its counts (not in nats:
    averaged per batch), and the bounds per example (with ``mask``), for standard errors.
    ``solve_progress``: told the ODE solver's t as it goes (``SolveProgress``). ``time_sampler``: the VLB's
    times over the batch (iid: independent per-example values; ``vlb_bound``).
    """
    method, settings = build(config.eval.method), config.eval.to_dict() | {"on_time": solve_progress,
                                                                            "time_sampler": time_sampler}

    def eval_step(params, batch, mask, rng):
        model = nnx.merge(graphdef, params)
        out = method(model, batch, rng, settings)
        bits = {k: diffusion.bits_per_dim(v, model.num_dims) for k, v in (out.bounds | out.parts).items()}
        sums = {"count": jnp.sum(mask.astype(jnp.float32))} | {
            k: jnp.sum(jnp.where(mask, v, 0.0)) for k, v in bits.items()}
        return sums, out.counts, {"mask": mask} | {k: bits[k] for k in out.bounds}
    return eval_step


def evaluate(eval_step, params, test, mesh, config, stop: Callable[[], object] | None = None,
             show_progress: bool = False, per_example: bool = False,
             solve_progress: SolveProgress | None = None, what: str = "test images") -> dict | None:
    """Bits/dim over one complete pass of the test split ``test`` (a ``vdm.data`` source) with
    ``params`` (``eval_step``: the compiled ``make_eval_step``; ``mesh``: the data mesh), by
    ``config.eval.method``: the means of its bounds and parts, each bound with its standard error over
    the images (``*_se``; the VLB: ``bpd`` and its terms, the ODE's: ``bpd_ode``), and its counts per batch.

    For a class-conditional model these are bounds on -log p(x | y).
    ``stop``: checked between batches; when it returns true, the pass ends and None is returned.
    ``show_progress``: a progress bar over the batches (``--mode eval``).
    ``per_example``: also return ``per_example`` = {"bpd": [N], ...}, each test image's bound (in test
    split order), for paired comparisons of models evaluated with the same randomness.
    ``solve_progress``: the eval step's ``SolveProgress``; with ``show_progress``, an ODE solve inside a
    batch logs where it is (solve k of K, t) at most every ``SOLVE_LOG_SECONDS``. ``what``: the records, as
    the progress line names them.
    """
    bs = config.eval.batch_size
    bs = -(-bs // mesh.size) * mesh.size  # round up to a multiple of the device count
    rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5EED)
    totals: dict[str, float] = {}
    num_examples = min(config.eval.num_examples or len(test), len(test))
    num_batches = -(-num_examples // bs)
    progress = None
    if show_progress:
        progress = metrics_lib.Progress(num_batches, log_every=max(1, num_batches // 10), unit="batch")
        progress.log(f"evaluating {num_examples} {what} in {num_batches} batches of {bs}")
    batches = data_lib.eval_batches(test, bs, num_examples=config.eval.num_examples,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    values_of: dict[str, list] = {}
    counts: dict[str, float] = {}
    inside = _SolveLines(progress, num_batches, config) if progress is not None and solve_progress else None
    if inside is not None:
        solve_progress.listener = inside
    try:
        for i, host in enumerate(batches):
            if stop is not None and stop():
                return None
            if progress is not None:
                progress.update(i)
            if inside is not None:
                solve_progress.start_batch()
                inside.batch = i
            batch = parallel.host_batch_to_global(mesh, host)
            mask = batch.pop("mask")
            with samplers.naming_max_steps("eval.ode.max_steps"):
                sums, batch_counts, values = jax.device_get(eval_step(params, batch, mask, jax.random.fold_in(rng, i)))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
            for k, v in batch_counts.items():
                counts[k] = counts.get(k, 0.0) + float(v)
            keep = np.asarray(values.pop("mask"), bool)
            for k, v in values.items():
                values_of.setdefault(k, []).append(np.asarray(v, np.float64)[keep])
    finally:
        if inside is not None:
            solve_progress.listener = None
    if progress is not None:
        progress.update(num_batches)
        progress.close()
    count = totals.pop("count")
    result = {k: v / count for k, v in totals.items()} | {"count": count}
    values = {name: np.concatenate(chunks) for name, chunks in values_of.items()}
    for name, v in values.items():  # standard error of the mean over the test images
        result[f"{name}_se"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    if per_example:
        result["per_example"] = values
    return result | {k: v / num_batches for k, v in counts.items()}  # per batch: a solver's steps serve a batch
