"""Gaussian data with its Bayes-optimal denoiser: a problem where every loss has a closed form.

For x ~ N(0, s^2 I_d) and z = alpha x + sigma eps, the posterior mean of eps is

    E[eps | z] = sigma z / (alpha^2 s^2 + sigma^2),

and its error per dimension is E(eps - eps_hat)^2 = v s^2 / (1 + v s^2) at SNR v. Hence
(Kingma et al. 2021, Sec. 5.1, for this data)

    E[L_inf] = (d / 2) log((1 + v_max s^2) / (1 + v_min s^2))          for every schedule,
    E[L_T]   = sum_i (d / 2) (v(s_i) - v(t_i)) s^2 / (1 + v(t_i) s^2)   (t_i = i / T, s_i = t_i - 1/T).

With a schedule per element (endpoints gamma_min,i, gamma_max,i) each element contributes its own
term and E[L_inf] = sum_i (1 / 2) log((1 + v_max,i s^2) / (1 + v_min,i s^2)), whatever the interiors.

These are computed here in float64 NumPy, independently of the JAX loss code, and are
used by the tests, the invariance experiment and the notebooks.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class GaussianData:
    """x ~ N(0, scale^2 I_dim)."""

    dim: int
    scale: float

    def sample(self, rng: jax.Array, batch_size: int) -> jax.Array:
        return self.scale * jax.random.normal(rng, (batch_size, self.dim))

    @staticmethod
    def _per_row(gamma: jax.Array) -> jax.Array:
        """gamma per example [B] as [B, 1]; per element [B, dim] as it is."""
        gamma = jnp.asarray(gamma)
        return gamma[:, None] if gamma.ndim == 1 else gamma

    def eps_fn(self, z: jax.Array, gamma: jax.Array, cond=None) -> jax.Array:
        """The Bayes-optimal eps-prediction E[eps | z_t] (gamma per example [B] or per element [B, dim])."""
        alpha_sq = jax.nn.sigmoid(-self._per_row(gamma))
        sigma_sq = jax.nn.sigmoid(self._per_row(gamma))
        return jnp.sqrt(sigma_sq) * z / (alpha_sq * self.scale**2 + sigma_sq)

    def x_fn(self, z: jax.Array, gamma: jax.Array, cond=None) -> jax.Array:
        """The Bayes-optimal x-prediction E[x | z_t]."""
        alpha_sq = jax.nn.sigmoid(-self._per_row(gamma))
        sigma_sq = jax.nn.sigmoid(self._per_row(gamma))
        return jnp.sqrt(alpha_sq) * self.scale**2 * z / (alpha_sq * self.scale**2 + sigma_sq)

    def eps_error(self, gamma) -> np.ndarray:
        """E||eps - E[eps | z_t]||^2 at gamma (float64, summed over dimensions)."""
        snr = np.exp(-np.asarray(gamma, np.float64))
        return self.dim * snr * self.scale**2 / (1.0 + snr * self.scale**2)

    def continuous_loss(self, gamma_min, gamma_max) -> float:
        """E[L_inf] for any schedule from gamma_min to gamma_max: floats, or arrays [dim] of per-element endpoints."""
        s2 = self.scale**2
        per = 0.5 * (np.log1p(np.exp(-np.asarray(gamma_min, np.float64)) * s2)
                     - np.log1p(np.exp(-np.asarray(gamma_max, np.float64)) * s2))
        return float(np.sum(np.broadcast_to(per, (self.dim,))))

    def discrete_loss(self, gamma_fn_np, num_steps: int) -> float:
        """E[L_T] for a schedule given as a NumPy function t [T] -> gamma [T] (or [T, dim] per element)."""
        t = np.arange(1, num_steps + 1, dtype=np.float64) / num_steps
        g_t, g_s = np.asarray(gamma_fn_np(t), np.float64), np.asarray(gamma_fn_np(t - 1.0 / num_steps), np.float64)
        snr = np.exp(-g_t)
        error = snr * self.scale**2 / (1.0 + snr * self.scale**2)  # per dimension
        per_step = 0.5 * num_steps * np.expm1(g_t - g_s) * error
        per_step = np.sum(per_step, axis=-1) if per_step.ndim == 2 else self.dim * per_step
        return float(np.mean(per_step))

    def flow_log_density(self, f: np.ndarray, gamma_0, gamma_1) -> np.ndarray:
        """log density per row of f (float64) of the probability-flow ODE's model at t = 0, started from
        N(0, I) at t = 1: per element the flow scales z by sqrt(v(t) / v(s)), v = alpha^2 s^2 + sigma^2, so
        the density is N(0, v_0 / v_1) in each element, whatever the schedule's interior (endpoints: floats
        or arrays [dim])."""
        def v(g):
            g = np.broadcast_to(np.asarray(g, np.float64), (self.dim,))
            return self.scale**2 / (1 + np.exp(g)) + 1 / (1 + np.exp(-g))

        var = v(gamma_0) / v(gamma_1)
        f = np.asarray(f, np.float64)
        return np.sum(-0.5 * np.log(2 * np.pi * var) - 0.5 * f**2 / var, axis=-1)

    def weighted_loss(self, weighting_np, logsnr_min: float, logsnr_max: float, num_points: int = 200001) -> float:
        """0.5 * int w(lambda) E||eps - eps_hat||^2 dlambda by the trapezoid rule (float64)."""
        lam = np.linspace(logsnr_min, logsnr_max, num_points)
        return float(np.trapezoid(0.5 * weighting_np(lam) * self.eps_error(-lam), lam))


@dataclasses.dataclass(frozen=True)
class CorrelatedGaussianData:
    """x ~ N(0, cov): the Bayes-optimal denoiser has a non-diagonal Jacobian.

    With C(gamma) = alpha^2 cov + sigma^2 I the marginal of z_gamma, E[eps | z] = sigma C^{-1} z,
    and the probability-flow ODE maps z_0 to z_1 = C_1^{1/2} C_0^{-1/2} z_0 (the C commute).
    Started from the prior N(0, I) at gamma_1, the flow's density at gamma_0 is therefore
    N(0, C_0 C_1^{-1}) exactly: ``flow_log_density``.
    """

    cov: np.ndarray

    @property
    def dim(self) -> int:
        return self.cov.shape[0]

    def sample(self, rng: jax.Array, batch_size: int) -> jax.Array:
        chol = jnp.asarray(np.linalg.cholesky(self.cov), jnp.float32)
        return jax.random.normal(rng, (batch_size, self.dim)) @ chol.T

    def eps_fn(self, z: jax.Array, gamma: jax.Array, cond=None) -> jax.Array:
        alpha_sq = jax.nn.sigmoid(-gamma)[:, None, None]
        sigma_sq = jax.nn.sigmoid(gamma)[:, None, None]
        c = alpha_sq * jnp.asarray(self.cov, jnp.float32) + sigma_sq * jnp.eye(self.dim)
        return jnp.sqrt(sigma_sq[:, :, 0]) * jnp.linalg.solve(c, z[..., None])[..., 0]

    def marginal_cov(self, gamma: float) -> np.ndarray:
        alpha_sq, sigma_sq = 1 / (1 + math.exp(gamma)), 1 / (1 + math.exp(-gamma))
        return alpha_sq * self.cov + sigma_sq * np.eye(self.dim)

    def flow_log_density(self, f: np.ndarray, gamma_0: float, gamma_1: float) -> np.ndarray:
        """log N(f; 0, C_0 C_1^{-1}) per row of f (float64)."""
        a = self.marginal_cov(gamma_0) @ np.linalg.inv(self.marginal_cov(gamma_1))
        a = 0.5 * (a + a.T)
        f = np.asarray(f, np.float64)
        _, logdet = np.linalg.slogdet(2 * np.pi * a)
        return -0.5 * logdet - 0.5 * np.einsum("bi,ij,bj->b", f, np.linalg.inv(a), f)
