"""Denoising networks for Variational Diffusion Models, and their one registry.

Every network is a Flax NNX module, a subclass of :class:`Network` registered by name with
:func:`register`, built as ``Net(context, *, <its hyper-parameters>, rngs=nnx.Rngs(seed))`` and
called as ``out = net(z, gamma, cond=None, *, dropout_rng=None)``:

* ``context``: a :class:`NetworkContext`, everything the model tells its networks, in one value
  built once by ``vdm.model.VDM``: the data's shape, the gamma range ``gamma_min`` / ``gamma_max``,
  ``num_classes``, ``latent_size``, ``gamma_map``, ``remat``, ``convolutions`` and the compute
  ``dtype``. The hyper-parameters (``channels``, ``num_blocks``, ``dropout``, ``param_dtype``, ...)
  are keywords with defaults, set from the config's ``model.network_kwargs``;
* ``z``: ``[B, H, W, C]`` images or ``[B, D]`` vectors; the class attribute
  ``input_rank`` (4 or 2) says which, so the model knows whether to flatten
  (:meth:`NetworkContext.in_channels` gives ``C`` or ``D``);
* ``gamma``: ``[B]`` float32, ``-log SNR``, normalised internally to ``[0, 1]``
  with the context's ``gamma_min`` / ``gamma_max``; or per element, the shape of
  ``z``, for schedules that differ per element: the embedding takes its per-example mean, and a
  network built with ``context.gamma_map`` (the model sets it for such schedules) takes the map as
  input channels too (MuLAN's conditioning; ``layers.gamma_map``);
* ``cond``: ``None`` (unconditional; for a network built with ``num_classes > 0`` it
  means the null class of classifier-free guidance) or ``{"label": int32 [B]}`` (plus
  ``"latent"`` ``[B, latent_size]`` with ``latent_size > 0``);
* ``out``: float32 with the shape of ``z``, exactly zero at initialisation; an eps-, x-,
  v-, F- or o-prediction as the model's ``prediction`` says (``vdm.predictions``);
* dropout is active if and only if a PRNG key ``dropout_rng`` is given;
* ``context.convolutions`` (:class:`vdm.nets.kernels.Convolutions`) computes every convolution
  (``nnx.Conv(..., conv_general_dilated=convolutions)``): it chooses the derivatives
  (fast custom ones on the CPU), never the values; a network without convolutions ignores it;
* weight decay falls on the ``kernel`` of every ``nnx.Linear`` and ``nnx.Conv`` the
  network holds, however built (``vdm.weight_decay``), and on nothing else.

Networks (:data:`NETWORKS`): ``"unet"`` (the VDM full-resolution U-Net, Kingma et al.
2021, arXiv:2107.00630), ``"multires_unet"`` (DDPM-style multi-resolution U-Net) and
``"mlp"`` (residual MLP for 2-D toy data). A new network, in this package or in a user's module,
is one class following the interface above, decorated with ``@register(name, example=...)``
(the example: tiny hyper-parameters for its checks); ``vdm.testing.check_piece("network", name)``
runs the contract's checks on it (``vdm.testing.network``), and the suite runs them on every
registered network.
"""

from __future__ import annotations

import warnings

from vdm.nets.contract import NETWORKS, Example, Network, NetworkContext, build, check_contract, lookup, register
from vdm.nets.kernels import Convolutions
from vdm.nets.layers import fourier_features, timestep_embedding
# the shipped networks register themselves on import, in this order (the order names are listed in)
from vdm.nets.unet import UNet  # noqa: I001
from vdm.nets.multires_unet import MultiResUNet
from vdm.nets.mlp import MLP

__all__ = [
    "MLP",
    "Convolutions",
    "Example",
    "NETWORKS",
    "MultiResUNet",
    "Network",
    "NetworkContext",
    "UNet",
    "build",
    "check_contract",
    "fourier_features",
    "lookup",
    "register",
    "timestep_embedding",
]


def __getattr__(name: str):
    """``ScoreUNet``, the 0.2 name of :class:`UNet`, kept for one release: the same class, with a
    ``DeprecationWarning`` naming ``UNet`` at each access. Raises AttributeError for any other missing name."""
    if name == "ScoreUNet":
        warnings.warn("vdm.nets.ScoreUNet is deprecated: use vdm.nets.UNet (the same class)", DeprecationWarning,
                      stacklevel=2)
        return UNet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
