"""What the network predicts: the parameterisations, each a linear map of its output to an eps-prediction.

For gamma = -log SNR, alpha^2 = sigmoid(-gamma), sigma^2 = sigmoid(gamma) and z = alpha x + sigma eps
(the conventions of ``vdm.diffusion``), every parameterisation here is linear in the network output:

    eps_hat = a(gamma) z + b(gamma) out,

so the network's own target is ``(eps - a z) / b`` and its squared error is the eps error over b^2:

    ||target - out||^2 = ||eps - eps_hat||^2 / b^2.

The bound and every weighted loss are written in eps (``vdm.diffusion``), and ``to_eps`` here is the one
place that applies the map (``prediction_target`` and ``prediction_error_scale`` are its inverse and its scale).
A parameterisation therefore changes what the network must output (and with it how well conditioned its
regression is at each noise level), never the objective: the loss of a model trained with
``--config.model.prediction=<name>`` is identical to the eps-MSE its output converts to (Kingma & Gao 2023,
App. D, where each of these objectives is a weighting of that one loss).

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

Each entry of ``PREDICTIONS`` is a coefficient function ``(gamma, alpha, sigma) -> (a, b)`` (``Coefficients``),
its arguments already shaped to broadcast against the data. A new parameterisation, here or in a user's module,
is one decorated function; its ``example`` is what the network should output by the parameterisation's own
definition, ``target(x, eps, alpha, sigma) -> out``, against which ``vdm.testing.check_piece("prediction",
name)`` checks the coefficients::

    @predictions.register("x_scaled", example=lambda x, eps, alpha, sigma: 2.0 * x)
    def _x_scaled(gamma, alpha, sigma):  # eps_hat = (z - alpha x_hat) / sigma with x_hat = out / 2
        return 1.0 / sigma, -0.5 * alpha / sigma
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from vdm import diffusion, registry

SIGMA_DATA = 0.5  # s_d of the F-prediction: EDM's value


class Coefficients(Protocol):
    """A parameterisation: the coefficients (a, b) of eps_hat = a z + b out at gamma.

    Called with gamma, alpha = sqrt(sigmoid(-gamma)) and sigma = sqrt(sigmoid(gamma)), each of one shape that
    broadcasts against the data (per example [B, 1, ...] or per element [B, ...]); returns a and b, each a
    Python number or an array that broadcasts to that shape, finite, b nonzero.
    """

    def __call__(self, gamma: jax.Array, alpha: jax.Array, sigma: jax.Array) -> tuple[Any, Any]: ...


Target = Callable[[Any, Any, Any, Any], Any]  # target(x, eps, alpha, sigma) -> out: a registration's example


def check_contract(name: str, piece: Coefficients) -> None:
    """The static contract of a parameterisation (run at registration; ``vdm.testing.prediction`` checks its values).

    Args:
        name: the name it is registered as.
        piece: its coefficient function.

    Raises:
        TypeError: ``piece`` is not callable as ``piece(gamma, alpha, sigma)``.
    """
    if not callable(piece):
        raise TypeError(f"a prediction is a function (gamma, alpha, sigma) -> (a, b), not {type(piece).__name__}")
    try:
        inspect.signature(piece).bind(0.0, 0.0, 0.0)
    except TypeError:
        raise TypeError("its coefficient function must take (gamma, alpha, sigma)") from None
    except ValueError:
        raise TypeError(f"the signature of {piece!r} cannot be read") from None


# name -> coefficient function, filled by ``register``.
PREDICTIONS: registry.Registry[Coefficients] = registry.Registry("prediction", check_contract)


def register(name: str, *, example: Target | None = None):
    """Decorator: register a coefficient function ``(gamma, alpha, sigma) -> (a, b)`` as the prediction ``name``.

    Args:
        name: the name configs give (``config.model.prediction``).
        example: what the network should output by the parameterisation's definition,
            ``target(x, eps, alpha, sigma) -> out`` (elementwise; ``vdm.testing.prediction`` checks that
            a z + b target(...) is eps); ``None``: only the map's own consistency is checked.

    Returns:
        A decorator that registers the function and returns it unchanged.

    Raises:
        vdm.registry.RegistrationError: the name is taken, or the function fails ``check_contract``.
    """
    return PREDICTIONS.register(name, example=example)


def _f_target(x, eps, alpha, sigma):
    """EDM's F by its definition: x = c_skip z / alpha + c_out F at EDM's noise level sigma / alpha."""
    sigma_edm, sd2 = sigma / alpha, SIGMA_DATA ** 2
    c_skip, c_out = sd2 / (sigma_edm ** 2 + sd2), sigma_edm * SIGMA_DATA / (sigma_edm ** 2 + sd2) ** 0.5
    return (x - c_skip * (alpha * x + sigma * eps) / alpha) / c_out


@register("eps", example=lambda x, eps, alpha, sigma: eps)
def _eps(gamma, alpha, sigma):
    return 0.0, 1.0


@register("x", example=lambda x, eps, alpha, sigma: x)
def _x(gamma, alpha, sigma):
    """eps_hat = (z - alpha x_hat) / sigma; alpha / sigma = exp(-gamma / 2)."""
    return 1.0 / sigma, -jnp.exp(-0.5 * gamma)


@register("v", example=lambda x, eps, alpha, sigma: alpha * eps - sigma * x)
def _v(gamma, alpha, sigma):
    """eps_hat = sigma z + alpha v_hat."""
    return sigma, alpha


@register("F", example=_f_target)
def _f(gamma, alpha, sigma):
    """eps_hat = (z - alpha (c_skip z / alpha + c_out F)) / sigma; 1 - c_skip = sigmoid(gamma - 2 log s_d)."""
    log_sd2 = 2.0 * jnp.log(SIGMA_DATA)
    return jax.nn.sigmoid(gamma - log_sd2) / sigma, -SIGMA_DATA * jnp.exp(-0.5 * jnp.logaddexp(gamma, log_sd2))


@register("o", example=lambda x, eps, alpha, sigma: eps - x)
def _o(gamma, alpha, sigma):
    """eps_hat = (z + alpha o_hat) / (alpha + sigma), from z = alpha x_hat + sigma eps_hat and o_hat = eps_hat - x_hat."""
    return 1.0 / (alpha + sigma), alpha / (alpha + sigma)


# --------------------------------------------------------------------------------------
# The map: everything becomes an eps-prediction here, and only here
# --------------------------------------------------------------------------------------


def coefficients(prediction: str | Coefficients, g: jax.Array):
    """(a, b) of eps_hat = a z + b out for ``prediction`` at gamma ``g``.

    Args:
        prediction: a name in ``PREDICTIONS``, or a coefficient function itself.
        g: gamma, already shaped to broadcast against the data.

    Returns:
        (a, b), each broadcasting to ``g``'s shape.

    Raises:
        ValueError: an unknown name (naming the valid ones).
    """
    fn = PREDICTIONS.lookup(prediction) if isinstance(prediction, str) else prediction
    return fn(g, *diffusion.alpha_sigma(g))


def to_eps(prediction: str | Coefficients, out: jax.Array, z: jax.Array, gamma: jax.Array) -> jax.Array:
    """eps_hat = a z + b out: a network output of kind ``prediction`` as an eps-prediction.

    Args:
        prediction: a name in ``PREDICTIONS`` (or a coefficient function).
        out: the network's output [B, ...].
        z: its input z_t [B, ...].
        gamma: the noise level, a scalar, per example [B] or per element (``vdm.diffusion.expand_to``).

    Returns:
        eps_hat [B, ...].

    Raises:
        ValueError: an unknown name.
    """
    if prediction == "eps":  # a = 0, b = 1: the output itself, with no 0 z + 1 out in the compiled program
        return out
    a, b = coefficients(prediction, diffusion.expand_to(gamma, z))
    return a * z + b * out


def prediction_error_scale(prediction: str | Coefficients, gamma: jax.Array) -> jax.Array:
    """b(gamma)^2 = ||eps - eps_hat||^2 / ||target - out||^2, the eps error per unit of the network's own error.

    Args:
        prediction: a name in ``PREDICTIONS`` (or a coefficient function).
        gamma: noise levels, any shape.

    Returns:
        b^2, float32, of ``gamma``'s shape (element-wise in gamma).
    """
    g = jnp.asarray(gamma, jnp.float32)
    _, b = coefficients(prediction, g)
    return jnp.broadcast_to(jnp.square(b), g.shape)


def prediction_target(prediction: str | Coefficients, f: jax.Array, eps: jax.Array, gamma: jax.Array) -> jax.Array:
    """What a network of kind ``prediction`` should output at z = diffuse(f, gamma, eps): (eps - a z) / b.

    Args:
        prediction: a name in ``PREDICTIONS`` (or a coefficient function).
        f: the data [B, ...].
        eps: the noise, f's shape.
        gamma: the noise level, per example [B] or per element.

    Returns:
        The target [B, ...]: ``to_eps`` of it is ``eps``.
    """
    z = diffusion.diffuse(f, gamma, eps)
    a, b = coefficients(prediction, diffusion.expand_to(gamma, z))
    return (eps - a * z) / b
