"""Denoising networks for Variational Diffusion Models.

Every network is a Flax NNX module constructed as
``Net(in_channels, ..., gamma_min=..., gamma_max=..., num_classes=0, remat=False,
convolutions=kernels.Convolutions(), dtype=..., rngs=nnx.Rngs(seed))``
and called as ``out = net(z, gamma, cond=None, *, dropout_rng=None)``:

* ``z``: ``[B, H, W, C]`` images or ``[B, D]`` vectors; the class attribute
  ``input_rank`` (4 or 2) says which, so the model knows whether to flatten;
* ``gamma``: ``[B]`` float32, ``-log SNR``, normalised internally to ``[0, 1]``
  with the ``gamma_min`` / ``gamma_max`` constructor arguments; or per element, the shape of
  ``z``, for schedules that differ per element: the embedding takes its per-example mean, and a
  network built with ``gamma_map=True`` (the model does so for such schedules) takes the map as
  input channels too (MuLAN's conditioning; ``layers.gamma_map``);
* ``cond``: ``None`` (unconditional; for a network built with ``num_classes > 0`` it
  means the null class of classifier-free guidance) or ``{"label": int32 [B]}``;
* ``out``: float32 with the shape of ``z``, exactly zero at initialisation; an eps-, x-,
  v-, F- or o-prediction as the model's ``prediction`` says (``vdm.predictions``);
* dropout is active if and only if a PRNG key ``dropout_rng`` is given;
* ``convolutions`` (:class:`vdm.nets.kernels.Convolutions`) computes every convolution
  (``nnx.Conv(..., conv_general_dilated=convolutions)``): it chooses the derivatives
  (fast custom ones on the CPU), never the values; a network without convolutions
  takes it and ignores it;
* weight decay falls on the ``kernel`` of every ``nnx.Linear`` and ``nnx.Conv`` the
  network holds, however built (``vdm.weight_decay``), and on nothing else.

Networks (:data:`NETWORKS`): ``"unet"`` (the VDM full-resolution U-Net, Kingma et al.
2021, arXiv:2107.00630), ``"multires_unet"`` (DDPM-style multi-resolution U-Net) and
``"mlp"`` (residual MLP for 2-D toy data). A new network is one module that follows the
interface above plus its entry here.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from vdm import registry
from vdm.nets.kernels import Convolutions
from vdm.nets.layers import fourier_features, timestep_embedding
from vdm.nets.mlp import MLP
from vdm.nets.multires_unet import MultiResUNet
from vdm.nets.unet import ScoreUNet

NETWORKS: dict[str, type[nnx.Module]] = {
    "unet": ScoreUNet,
    "multires_unet": MultiResUNet,
    "mlp": MLP,
}


def lookup(name: str) -> type[nnx.Module]:
    """The network class registered as ``name``."""
    return registry.lookup(NETWORKS, name, "network")


def build(name: str, **kwargs: Any) -> nnx.Module:
    """Constructs the network registered as ``name`` in :data:`NETWORKS` with ``kwargs``.

    Example: ``build("unet", in_channels=1, channels=32, num_blocks=4, rngs=nnx.Rngs(0))``.
    """
    return lookup(name)(**kwargs)


__all__ = [
    "MLP",
    "Convolutions",
    "NETWORKS",
    "MultiResUNet",
    "ScoreUNet",
    "build",
    "fourier_features",
    "lookup",
    "timestep_embedding",
]
