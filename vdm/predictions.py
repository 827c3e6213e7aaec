"""What the network predicts: the parameterisations, each a linear map of its output to an eps-prediction.

For gamma = -log SNR, alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma) and z = alpha x + sigma eps
(the conventions of ``vdm.diffusion``), every parameterisation here is linear in the network output:

    eps_hat = a(gamma) z + b(gamma) out,

so the network's own target is ``(eps - a z) / b`` and its squared error is the eps error over b^2:

    ||target - out||^2 = ||eps - eps_hat||^2 / b^2.

The bound and every weighted loss are written in eps (``vdm.diffusion``), and ``vdm.diffusion.to_eps`` is
the one place that applies the map. A parameterisation therefore changes what the network must output (and
with it how well conditioned its regression is at each noise level), never the objective: the loss of a
model trained with ``--config.model.prediction=<name>`` is identical to the eps-MSE its output converts to
(Kingma & Gao 2023, App. D, where each of these objectives is a weighting of that one loss).

| name | the network outputs                                          | a                    | b                            |
|------|--------------------------------------------------------------|----------------------|------------------------------|
| eps  | eps                                                          | 0                    | 1                            |
| x    | x                                                            | 1 / sigma            | -alpha / sigma               |
| v    | v = alpha eps - sigma x (Salimans & Ho 2022)                 | sigma                | alpha                        |
| F    | EDM's F (Karras et al. 2022), x = c_skip z / alpha + c_out F | (1 - c_skip) / sigma | -s_d / sqrt(e^gamma + s_d^2) |
| o    | o = eps - x, the velocity of the path (1 - s) x + s eps      | 1 / (alpha + sigma)  | alpha / (alpha + sigma)      |

so ||target - out||^2 is ||eps - eps_hat||^2 times 1 / b^2: 1 (eps), 1 / SNR (x), 1 + 1 / SNR (v),
(e^gamma + s_d^2) / s_d^2 (F), (1 + sigma / alpha)^2 (o).

F: EDM writes the data as seen at noise level sigma_e = sigma / alpha = e^(gamma / 2) (its variance-
exploding x + sigma_e eps is z / alpha) and predicts D = c_skip (z / alpha) + c_out F with
c_skip = s_d^2 / (sigma_e^2 + s_d^2), c_out = sigma_e s_d / sqrt(sigma_e^2 + s_d^2), s_d = sigma_data = 0.5
(EDM's value for data in [-1, 1]). EDM also scales the network's input by c_in = 1 / sqrt(sigma_e^2 + s_d^2);
here every network sees z itself, whose scale is already about 1 (variance preserving), so only the output is
preconditioned.

o: the optimal-transport (rectified flow) path z' = (1 - s) x + s eps, s = sigma / (alpha + sigma), is z
divided by alpha + sigma, and o = dz'/ds = eps - x is its velocity: flow matching (Lipman et al. 2023) is
o-prediction with the ``flow_matching`` weighting, and with the ``optimal_transport`` schedule t is s itself.

Each entry is ``coefficients(gamma, alpha, sigma) -> (a, b)`` with arrays already broadcast to the data; a new
parameterisation is one function and its line in ``PREDICTIONS``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SIGMA_DATA = 0.5  # s_d of the F-prediction: EDM's value


def _eps(gamma, alpha, sigma):
    return 0.0, 1.0


def _x(gamma, alpha, sigma):
    """eps_hat = (z - alpha x_hat) / sigma; alpha / sigma = exp(-gamma / 2)."""
    return 1.0 / sigma, -jnp.exp(-0.5 * gamma)


def _v(gamma, alpha, sigma):
    """eps_hat = sigma z + alpha v_hat."""
    return sigma, alpha


def _f(gamma, alpha, sigma):
    """eps_hat = (z - alpha (c_skip z / alpha + c_out F)) / sigma; 1 - c_skip = sigmoid(gamma - 2 log s_d)."""
    log_sd2 = 2.0 * jnp.log(SIGMA_DATA)
    return jax.nn.sigmoid(gamma - log_sd2) / sigma, -SIGMA_DATA * jnp.exp(-0.5 * jnp.logaddexp(gamma, log_sd2))


def _o(gamma, alpha, sigma):
    """eps_hat = (z + alpha o_hat) / (alpha + sigma), from z = alpha x_hat + sigma eps_hat and o_hat = eps_hat - x_hat."""
    return 1.0 / (alpha + sigma), alpha / (alpha + sigma)


PREDICTIONS = {
    "eps": _eps,
    "x": _x,
    "v": _v,
    "F": _f,
    "o": _o,
}
