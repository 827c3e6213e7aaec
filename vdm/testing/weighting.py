"""The contract checks of a loss weighting (``vdm.weightings``): run on every registered one by the suite.

A weighting is a :class:`vdm.weightings.Weighting`: ``w(logsnr, **params)`` with the flags it declares. On a
log-SNR grid over [-20, 20], with its example parameters bound (the registration's ``example``, a dict of
parameters; ``None``: its defaults), it must be

- callable under ``jax.jit``, float32 in giving float32 out of the same shape (a scalar, a grid, per element);
- finite and positive, with a finite gradient;
- non-increasing in log-SNR where it declares ``monotonic`` (Kingma & Gao 2023: monotonic in lambda
  means the objective is an ELBO of noise-augmented data), to float32 rounding;
- 1 everywhere if and only if it declares ``is_elbo``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vdm import testing, weightings

LOGSNR = np.linspace(-20.0, 20.0, 4001, dtype=np.float32)  # lambda, increasing
LOGSNR.flags.writeable = False
ROUNDING = 1e-7  # a monotonic weighting may rise by this much relative to its value, between neighbours


def check(name: str, piece: weightings.Weighting, example: dict | None) -> None:
    """Run every check of the weighting contract on ``piece`` (see the module's docstring).

    Args:
        name: its name, for messages.
        piece: a ``vdm.weightings.Weighting`` (what ``WEIGHTINGS`` holds).
        example: the parameters to bind (``{"bias": 1.0}``), or ``None`` for its defaults.

    Raises:
        AssertionError: ``weighting '<name>' fails <check>: <what was found>``.
    """
    checking = testing.checker("weighting", name)

    with checking("the static contract"):
        weightings.check_contract(name, piece)
    with checking("its example parameters"):
        w = weightings.build(piece, **(example or {}))
    with checking("jit, float32 and shapes"):
        jitted = jax.jit(w)
        for x in (jnp.float32(1.5), jnp.full((2, 3, 4), -1.5, jnp.float32), jnp.asarray(LOGSNR)):
            out = jitted(x)
            assert out.shape == x.shape and out.dtype == jnp.float32, \
                f"float32 {x.shape} in gives {out.dtype} {out.shape} out"
        values = np.asarray(jitted(jnp.asarray(LOGSNR)), np.float64)
    with checking("finiteness and positivity"):
        bad = ~np.isfinite(values) | ~(values > 0)
        assert not bad.any(), f"w = {values[bad][0]} at log-SNR {LOGSNR[bad][0]}"
        grad = np.asarray(jax.jit(jax.grad(lambda lam: jnp.sum(w(lam))))(jnp.asarray(LOGSNR)))
        assert np.all(np.isfinite(grad)), f"non-finite gradient at log-SNR {LOGSNR[~np.isfinite(grad)][0]}"
    with checking("declared monotonicity"):
        if piece.monotonic:
            rise = np.diff(values) > ROUNDING * np.abs(values[:-1])
            assert not rise.any(), (f"declared monotonic (non-increasing in log-SNR) but w rises from "
                                    f"{values[:-1][rise][0]:.6g} to {values[1:][rise][0]:.6g} after log-SNR "
                                    f"{LOGSNR[:-1][rise][0]:.4g}")
    with checking("declared is_elbo"):
        ones = bool(np.all(values == 1.0))
        assert ones == piece.is_elbo, ("declares is_elbo but w is not 1 everywhere" if piece.is_elbo else
                                       "w = 1 everywhere but it does not declare is_elbo")
