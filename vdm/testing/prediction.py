"""The contract checks of a parameterisation (``vdm.predictions``): run on every registered one by the suite.

A parameterisation is a coefficient function ``(gamma, alpha, sigma) -> (a, b)`` with eps_hat = a z + b out.
It must give

- coefficients that broadcast to gamma's shape, so that ``to_eps`` keeps the data's shape and float32 for
  gamma per example [B] and per element [B, ...];
- finite coefficients with b nonzero for gamma over [-20, 20] (wider than any shipped schedule's
  [-13.3, 5]);
- eps back from its own target: for random z, eps and gamma in [-13.3, 5], with x = (z - sigma eps) / alpha
  (so that z = alpha x + sigma eps), ``to_eps`` of ``prediction_target`` is eps, to float32 rounding;
- and, when its registration gives the parameterisation's definition as ``example``,
  ``target(x, eps, alpha, sigma) -> out`` (what the network should output, written independently of (a, b)),
  ``to_eps`` of that output is eps: wrong coefficients fail here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vdm import diffusion, predictions, testing

GAMMA_WIDE = np.linspace(-20.0, 20.0, 4001, dtype=np.float32)  # where the coefficients must be finite
GAMMA_WIDE.flags.writeable = False
GAMMA_RANGE = (-13.3, 5.0)  # where eps must come back to float32 rounding
TOLERANCE = 2e-3  # |eps_hat - eps| allowed, relative to 1 + |eps| (the x and F maps divide by sigma ~ 1e-3)


def _draws(per_element: bool):
    """z, eps [B, 2, 3], gamma [B] or [B, 2, 3] in GAMMA_RANGE, and x = (z - sigma eps) / alpha, all float32."""
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    shape = (256, 2, 3)
    z, eps = jax.random.normal(keys[0], shape), jax.random.normal(keys[1], shape)
    gamma = jax.random.uniform(keys[2], shape if per_element else shape[:1], minval=GAMMA_RANGE[0],
                               maxval=GAMMA_RANGE[1])
    alpha, sigma = diffusion.alpha_sigma(diffusion.expand_to(gamma, z))
    return z, eps, gamma, (z - sigma * eps) / alpha, alpha, sigma


def _assert_eps(eps_hat, eps, what: str) -> None:
    eps_hat, eps = np.asarray(eps_hat, np.float64), np.asarray(eps, np.float64)
    error = np.abs(eps_hat - eps) / (1.0 + np.abs(eps))
    worst = np.unravel_index(np.argmax(np.where(np.isfinite(error), error, np.inf)), error.shape)
    assert np.all(error <= TOLERANCE), (f"{what} gives eps_hat = {eps_hat[worst]:.6g} for eps = {eps[worst]:.6g} "
                                        f"(relative error {error[worst]:.3g} > {TOLERANCE})")


def check(name: str, piece: predictions.Coefficients, example: predictions.Target | None) -> None:
    """Run every check of the prediction contract on ``piece`` (see the module's docstring).

    Args:
        name: its name, for messages.
        piece: the coefficient function ``(gamma, alpha, sigma) -> (a, b)``.
        example: ``target(x, eps, alpha, sigma) -> out``, what the network should output by the
            parameterisation's definition; ``None`` leaves that check out.

    Raises:
        AssertionError: ``prediction '<name>' fails <check>: <what was found>``.
    """
    checking = testing.checker("prediction", name)

    with checking("the static contract"):
        predictions.check_contract(name, piece)
    with checking("shapes per example and per element"):
        for per_element in (False, True):
            z, eps, gamma, *_ = _draws(per_element)
            g = diffusion.expand_to(gamma, z)
            for label, c in zip("ab", predictions.coefficients(piece, g)):
                assert jnp.broadcast_shapes(jnp.shape(c), g.shape) == g.shape, \
                    f"{label} of shape {jnp.shape(c)} does not broadcast to gamma's {g.shape}"
            out = jax.jit(lambda o, z, g: predictions.to_eps(piece, o, z, g))(eps, z, gamma)
            assert out.shape == z.shape and out.dtype == jnp.float32, \
                f"to_eps gives {out.dtype} {out.shape} for float32 z {z.shape} and gamma {gamma.shape}"
    with checking("finite coefficients"):
        g = jnp.asarray(GAMMA_WIDE)
        a, b = (np.broadcast_to(np.asarray(c, np.float64), g.shape) for c in predictions.coefficients(piece, g))
        for label, c in (("a", a), ("b", b)):
            bad = ~np.isfinite(c)
            assert not bad.any(), f"{label} = {c[bad][0]} at gamma {GAMMA_WIDE[bad][0]:.4g}"
        assert np.all(b != 0), f"b = 0 at gamma {GAMMA_WIDE[b == 0][0]:.4g}: its target (eps - a z) / b is not finite"
    with checking("eps from its own target"):
        for per_element in (False, True):
            z, eps, gamma, x, *_ = _draws(per_element)
            target = predictions.prediction_target(piece, x, eps, gamma)
            _assert_eps(predictions.to_eps(piece, target, diffusion.diffuse(x, gamma, eps), gamma), eps,
                        "to_eps of prediction_target")
    if example is None:
        return
    with checking("eps from its declared target"):
        for per_element in (False, True):
            z, eps, gamma, x, alpha, sigma = _draws(per_element)
            out = jnp.asarray(example(x, eps, alpha, sigma), jnp.float32)
            _assert_eps(predictions.to_eps(piece, out, z, gamma), eps, "to_eps of the declared target(x, eps, ...)")
