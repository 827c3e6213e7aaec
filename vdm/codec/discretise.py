"""The latent grid of the bits-back codec: each latent z_{t_i} of the T-step model coded on a grid of its own.

Latent i (i = 0..T, t_i = i / T) is read from the stream under q and written under p, both on the same grid,
so the grid's width delta_i cancels from the net rate; what is left of it is the error of treating each bin's
mass as density x width, which shrinks as delta_i / std^2 does. Writing gamma_i = gamma(t_i),
c_i = -expm1(gamma_{i-1} - gamma_i) (the ``vdm.samplers.ancestral`` constant):

    latent    read under                              written under
    z_0       q(z_0 | x)          std sigma_0           p(z_0 | z_{t_1})        std sigma_0 sqrt(c_1)
    z_{t_i}   q(z_{t_i} | z_{t_{i-1}}) std sigma_i sqrt(c_i)   p(z_{t_i} | z_{t_{i+1}}) std sigma_i sqrt(c_{i+1})
    z_1       q(z_1 | z_{t_{T-1}})  std sigma_1 sqrt(c_T)  p(z_1) = N(0, I)     std 1

and ``delta_i = fraction x min(those two stds)`` per element. Each Gaussian is coded over a window of
``window_stds`` of its std about its mean (in grid units), so the coder's alphabet stays small (a few hundred to a
few thousand symbols) and the probability its leaky quantisation gives every symbol stays negligible.

The choice of ``fraction`` (``DEFAULT_FRACTION``), measured on the analytic Gaussian model (8 x 8 x 1, V = 256,
scale 0.25, linear gamma -13.3..5, 64 images; the net rate minus the images' own L_T in bits/dim, +- its standard
error; the initial words per image of a 64-image batch beside it; ``tests/test_codec.py`` checks the default):

    fraction   T = 30 (L_T 10.19)   T = 100 (L_T 8.29)   T = 300 (L_T 7.83)   initial words (T = 100)
    1          +0.46 +- 0.05        +0.09 +- 0.03        +0.03 +- 0.02        7.4 bits/dim
    0.5        +0.77 +- 0.06        +0.22 +- 0.05        +0.09 +- 0.03        9.4
    0.25       --                   +0.28 +- 0.06        --                   11.4

A finer grid does not bring the rate closer: the gap is not the grid's error but the reads' (a stack coder's read
after a write is not a fresh sample of q where p and q differ; ``vdm.codec.ans``), which shrinks as T grows, and
a finer grid costs initial bits. Hence a bin of one std.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

DEFAULT_FRACTION = 1.0
DEFAULT_WINDOW_STDS = 40.0


@dataclasses.dataclass(frozen=True)
class Grid:
    """How the latents are discretised: bin width ``fraction`` x the smaller std each latent is coded under, each
    Gaussian coded over ``window_stds`` stds about its mean."""

    fraction: float = DEFAULT_FRACTION
    window_stds: float = DEFAULT_WINDOW_STDS

    def check(self) -> None:
        """Raises ValueError (one line) unless 0 < fraction <= 1 and window_stds >= 8."""
        if not 0 < self.fraction <= 1:
            raise ValueError(f"grid fraction {self.fraction} must be in (0, 1]")
        if not self.window_stds >= 8:
            raise ValueError(f"grid window_stds {self.window_stds} must be at least 8")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything about the T + 1 latents that depends on the schedule only (float64 arrays [T + 1, E], E = 1 for
    a schedule per example, the number of elements for one per element).

    Attributes:
        alpha, sigma: alpha_i and sigma_i.
        c: c_i = -expm1(gamma_{i-1} - gamma_i) (row 0 unused, 1).
        q_std: the std latent i is read under; p_std: the std it is written under.
        delta: the grid's bin width of latent i.
        q_window, p_window: int [T + 1], the half-widths in bins of the coder's windows.
    """

    alpha: np.ndarray
    sigma: np.ndarray
    c: np.ndarray
    q_std: np.ndarray
    p_std: np.ndarray
    delta: np.ndarray
    q_window: np.ndarray
    p_window: np.ndarray

    @property
    def num_steps(self) -> int:
        """T, the model's steps (the latents are T + 1)."""
        return self.alpha.shape[0] - 1


def plan(gammas: np.ndarray, grid: Grid) -> Plan:
    """The ``Plan`` of the float32 ``gammas`` [T + 1, E] (gamma(t_i) for t_i = i / T) under ``grid``."""
    g = np.asarray(gammas, np.float32).astype(np.float64)
    alpha, sigma = np.sqrt(1 / (1 + np.exp(g))), np.sqrt(1 / (1 + np.exp(-g)))
    c = np.ones_like(g)
    c[1:] = -np.expm1(g[:-1] - g[1:])
    q_std, p_std = np.empty_like(g), np.empty_like(g)
    q_std[0], q_std[1:] = sigma[0], sigma[1:] * np.sqrt(c[1:])
    p_std[:-1], p_std[-1] = sigma[:-1] * np.sqrt(c[1:]), 1.0
    delta = grid.fraction * np.minimum(q_std, p_std)

    def window(std):
        return np.ceil(grid.window_stds * np.max(std / delta, axis=1)).astype(np.int64)

    p_window = window(p_std)
    p_window[-1] = int(math.ceil(grid.window_stds / np.min(delta[-1])))  # the prior: centred on 0
    return Plan(alpha, sigma, c, q_std, p_std, delta, window(q_std), p_window)


def initial_words(plan_: Plan, num_values: int) -> int:
    """The random 32-bit words the stream starts from, for a first batch of ``num_values`` latent values per latent
    (images x dimensions).

    Before step i writes z_{t_{i-1}} back it has read z_{t_{i-1}} and z_{t_i}: the stream must hold the entropy of
    two consecutive latents on their grids, h_i = log2(sqrt(2 pi e) std_i / delta_i) bits per value each (what the
    steps before wrote back covers the rest, on average more: their KL). The words are enough for the largest such
    pair plus 2 bits per value (the spread of the reads), and 2 more (the coder's state)."""
    bits = np.max(np.log2(math.sqrt(2 * math.pi * math.e) * plan_.q_std / plan_.delta), axis=1)
    pair = float(np.max(bits[:-1] + bits[1:])) if len(bits) > 1 else float(bits[0])
    return 2 + int(math.ceil(num_values * (pair + 2.0) / 32))
