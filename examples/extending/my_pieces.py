"""A researcher's own pieces, registered from outside the package: a noise schedule and a loss weighting.

Import this module (it must be importable: on ``PYTHONPATH``, or beside the config file that imports it)
and the names ``"power"`` and ``"tempered_sigmoid"`` work wherever a config names a schedule or a weighting.
Check them as the library checks its own::

    python -c "import my_pieces; from vdm import testing; testing.check_piece('schedule', 'power'); \
testing.check_piece('weighting', 'tempered_sigmoid')"
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vdm import schedules, weightings


@schedules.register("power", example={"kwargs": {"power": 2.0}})
class Power(schedules.Schedule):
    """gamma(t) = gamma_min + (gamma_max - gamma_min) t^power: fixed endpoints, nothing learned.

    Args:
        gamma_min: gamma(0), the log-SNR's negative at the data end.
        gamma_max: gamma(1), at the noise end.
        power: the exponent (> 0); 1 is the fixed linear schedule.
        rngs: unused (nothing is learned).
    """

    learns_endpoints = False

    def __init__(self, gamma_min: float, gamma_max: float, *, power: float = 1.5, rngs: nnx.Rngs | None = None):
        if not power > 0:
            raise ValueError(f"power={power}: must be positive")
        self.low, self.high, self.power = float(gamma_min), float(gamma_max), float(power)

    def endpoints(self) -> tuple[jax.Array, jax.Array]:
        """(gamma_min, gamma_max) as float32 scalars."""
        return jnp.float32(self.low), jnp.float32(self.high)

    def __call__(self, t: jax.Array) -> jax.Array:
        """gamma [B] of times t [B] in [0, 1]."""
        return self.low + (self.high - self.low) * t ** self.power


@weightings.register("tempered_sigmoid", monotonic=True)
def tempered_sigmoid(logsnr: jax.Array, bias: float = 2.0, temperature: float = 2.0) -> jax.Array:
    """w(lambda) = sigmoid((bias - lambda) / temperature): Kingma & Gao's sigmoid weighting, softened.

    Non-increasing in lambda (monotonic), so the weighted loss is an ELBO of noise-augmented data.
    """
    return jax.nn.sigmoid((bias - logsnr) / temperature)
