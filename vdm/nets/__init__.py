"""Noise-prediction ("score") networks for Variational Diffusion Models.

Every network is a Flax NNX module constructed as
``Net(in_channels, ..., rngs=nnx.Rngs(seed))`` and called as
``eps_hat = net(z, gamma, *, dropout_rng=None)``:

* ``z``: ``[B, H, W, C]`` images (U-Nets) or ``[B, D]`` vectors (MLP);
* ``gamma``: ``[B]`` float32, ``-log SNR``, normalised internally to ``[0, 1]``
  with the ``gamma_min`` / ``gamma_max`` constructor arguments;
* ``eps_hat``: float32 with the shape of ``z``, exactly zero at initialisation;
* dropout is active if and only if a PRNG key ``dropout_rng`` is given.

Available networks (see :data:`NETWORKS`): ``"unet"`` (the VDM full-resolution
U-Net, Kingma et al. 2021, arXiv:2107.00630), ``"multires_unet"`` (DDPM-style
multi-resolution U-Net) and ``"mlp"`` (residual MLP for 2-D toy data).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from vdm.nets.layers import fourier_features, timestep_embedding
from vdm.nets.mlp import MLP
from vdm.nets.unet import MultiResUNet, ScoreUNet

NETWORKS: dict[str, type[nnx.Module]] = {
    "unet": ScoreUNet,
    "multires_unet": MultiResUNet,
    "mlp": MLP,
}


def build(name: str, **kwargs: Any) -> nnx.Module:
    """Constructs the network registered as ``name`` in :data:`NETWORKS` with ``kwargs``.

    Example: ``build("unet", in_channels=1, channels=32, num_blocks=4, rngs=nnx.Rngs(0))``.

    Raises:
      ValueError: if ``name`` is not a key of :data:`NETWORKS`.
    """
    try:
        cls = NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; valid names: {sorted(NETWORKS)}") from None
    return cls(**kwargs)


__all__ = [
    "MLP",
    "NETWORKS",
    "MultiResUNet",
    "ScoreUNet",
    "build",
    "fourier_features",
    "timestep_embedding",
]
