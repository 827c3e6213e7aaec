"""Test bits/dim: the compiled eval step, and one pass of it over the test split.

``make_eval_step`` gives, per padded batch, masked sums of the per-example bounds by
``config.eval.method``; ``evaluate`` runs it over the test split (``config.eval.batch_size``
images at a time, the same randomness for every model: a function of ``config.seed`` and the
batch) and returns the means with their standard errors over the images.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vdm import data as data_lib, diffusion as diffusion_lib, metrics as metrics_lib, model as model_lib, parallel


def make_eval_step(graphdef, config):
    """Masked sums over one padded batch of the per-example bits/dim, by ``config.eval.method``.

    ``vlb``: every VLB term; ``ode``: the probability-flow ODE's dequantised bound
    (``bpd_ode``) and the solver's network evaluations (``ode_nfe``); ``both``: both, on the
    same images. ``values`` holds the bounds per example (with ``mask``), for standard errors.
    """
    method, settings = config.eval.method, config.eval.ode.to_dict()

    def eval_step(params, batch, mask, rng):
        model = nnx.merge(graphdef, params)
        sums, values = {"count": jnp.sum(mask.astype(jnp.float32))}, {"mask": mask}
        if method in ("vlb", "both"):
            terms = model_lib.evaluation_terms(model, batch, jax.random.fold_in(rng, 0), num_steps=config.eval.num_steps)
            sums |= model_lib.bpd_sums(terms, model.num_dims, mask)
            sums.pop("loss")
            values["bpd"] = diffusion_lib.bits_per_dim(terms.vlb, model.num_dims)
        if method in ("ode", "both"):
            nll, nfe = model_lib.ode_nll(model, batch, jax.random.fold_in(rng, 1), **settings)
            values["bpd_ode"] = diffusion_lib.bits_per_dim(nll, model.num_dims)
            sums |= {"bpd_ode": jnp.sum(jnp.where(mask, values["bpd_ode"], 0.0)), "ode_nfe": nfe.astype(jnp.float32)}
        return sums, values
    return eval_step


def evaluate(eval_step, params, test, mesh, config, stop: Callable[[], object] | None = None,
             show_progress: bool = False, per_example: bool = False) -> dict | None:
    """Bits/dim over one complete pass of the test split ``test`` (a ``vdm.data`` source) with
    ``params`` (``eval_step``: the compiled ``make_eval_step``; ``mesh``: the data mesh), by
    ``config.eval.method``: the VLB (``bpd`` and its terms), the probability-flow ODE's bound
    (``bpd_ode``) or both, each with its standard error over the images (``*_se``).

    For a class-conditional model these are bounds on -log p(x | y).
    ``stop``: checked between batches; when it returns true, the pass ends and None is returned.
    ``show_progress``: a progress bar over the batches (``--mode eval``).
    ``per_example``: also return ``per_example`` = {"bpd": [N], ...}, each test image's bound (in test
    split order), for paired comparisons of models evaluated with the same randomness.
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
        progress.log(f"evaluating {num_examples} test images in {num_batches} batches of {bs}")
    batches = data_lib.eval_batches(test, bs, num_examples=config.eval.num_examples,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    values_of: dict[str, list] = {}
    for i, host in enumerate(batches):
        if stop is not None and stop():
            return None
        if progress is not None:
            progress.update(i)
        batch = parallel.host_batch_to_global(mesh, host)
        mask = batch.pop("mask")
        sums, values = jax.device_get(eval_step(params, batch, mask, jax.random.fold_in(rng, i)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        keep = np.asarray(values.pop("mask"), bool)
        for k, v in values.items():
            values_of.setdefault(k, []).append(np.asarray(v, np.float64)[keep])
    if progress is not None:
        progress.update(num_batches)
        progress.close()
    count = totals.pop("count")
    nfe = totals.pop("ode_nfe", None)
    result = {k: v / count for k, v in totals.items()} | {"count": count}
    values = {name: np.concatenate(chunks) for name, chunks in values_of.items()}
    for name, v in values.items():  # standard error of the mean over the test images
        result[f"{name}_se"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    if per_example:
        result["per_example"] = values
    if nfe is not None:
        result["ode_nfe"] = nfe / num_batches  # per batch: the solver's steps are shared by a batch
    return result
