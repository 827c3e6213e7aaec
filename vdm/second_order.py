"""i-DODE's fine-tuning term (Zheng et al., ICML 2023, Sec. 4.2, "error-bounded high-order flow matching").

The ODE's likelihood depends on the velocity field's divergence as well as on the field itself, and the
first-order loss ||v - v_hat||^2 does not control the divergence. i-DODE adds, per example, the square of a
second-order residual whose expectation vanishes for the true velocity:

    R = sigma_t div_z v_hat(z_t) - alpha_t (d - sg ||v - v_hat||^2),       term = lambda_2 w R^2 / d,

with d the data's dimension, sg a stop-gradient, div_z by Hutchinson's estimator (one Rademacher probe, one
vector-Jacobian product of the network), w the weight the first-order term gives that example's squared velocity
error (0.5 Z under i-DODE's importance sampling) and lambda_2 = ``loss.second_order_weight`` (i-DODE: 0.1). It is
their ``second_order`` loss (``model_vdm.py``), written for the velocity v = alpha eps - sigma x, which is their F.
Fine-tuning is a second run from the first one's checkpoint with the term on (``configs/mnist_idode_finetune.py``).
The term is not part of the bound: it changes what is trained, not what is reported.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from vdm import diffusion, predictions, time_sampling, weightings

# The probe's key is fold_in(the diffusion noise's key, PROBE_STREAM): the bound's own draws are unchanged.
PROBE_STREAM = 0x2D0


def residual(eps_key: jax.Array, f: jax.Array, gamma: jax.Array, velocity_fn: Callable, cond=None):
    """(R, ||v - v_hat||^2) per example [B] (the module docstring) at z_t = diffuse(f, gamma, eps), eps drawn from
    ``eps_key`` as ``diffusion.diffusion_terms`` draws it; gamma per example. ``velocity_fn(z, gamma, cond)`` is the
    network, a v-prediction."""
    eps = jax.random.normal(eps_key, f.shape, f.dtype)
    z = diffusion.diffuse(f, gamma, eps)
    probe = jax.random.rademacher(jax.random.fold_in(eps_key, PROBE_STREAM), f.shape, f.dtype)
    v_hat, vjp = jax.vjp(lambda zz: velocity_fn(zz, gamma, cond), z)
    (pulled,) = vjp(probe)
    divergence = diffusion.sum_per_example(pulled * probe)
    error = diffusion.sum_per_example(jnp.square(predictions.prediction_target("v", f, eps, gamma) - v_hat))
    alpha, sigma = diffusion.alpha_sigma(gamma)
    return sigma * divergence - alpha * (f[0].size - jax.lax.stop_gradient(error)), error


def term(eps_key: jax.Array, f: jax.Array, levels: time_sampling.NoiseLevels, velocity_fn: Callable, *,
         weighting: weightings.Weighting, weight: float, cond=None) -> jax.Array:
    """lambda_2 w R^2 / d per example [B] at the bound's own z_t (``residual``; ``levels`` as the bound drew them)."""
    r, _ = residual(eps_key, f, levels.gamma, velocity_fn, cond)
    # the first-order term's weight on ||v - v_hat||^2: 0.5 w(lambda) rate b^2 (b^2 = alpha^2 for v)
    gamma = levels.gamma
    w = 0.5 * weighting(-gamma) * levels.rate * predictions.prediction_error_scale("v", gamma)
    return weight * w * jnp.square(r) / f[0].size
