"""Tests for ``vdm.weight_decay``: decay falls on the weight matrices, by the kind of layer."""
from __future__ import annotations

import jax
import pytest
from flax import nnx

from vdm import configs, weight_decay
from vdm.model import VDM

SHAPES = {"cifar10": (32, 32, 3), "imagenet32": (32, 32, 3), "imagenet64": (64, 64, 3), "toy2d": (1, 1, 2),
          "digits": (8, 8, 1), "digits_cond": (8, 8, 1), "test": (8, 8, 1), "mnist": (28, 28, 1),
          "mnist_cond": (28, 28, 1), "mnist_idode": (28, 28, 1), "mnist_flow": (28, 28, 1),
          "mnist_mulan": (28, 28, 1), "mnist_diffenc": (28, 28, 1),
          "cifar10_idode": (32, 32, 3), "cifar10_mulan": (32, 32, 3), "cifar10_diffenc": (32, 32, 3),
          "mnist_idode_finetune": (28, 28, 1)}


def flat(mask) -> dict:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}


def test_shapes_cover_every_shipped_config():
    assert set(SHAPES) == set(configs.CONFIGS)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shipped_config_decays_exactly_the_network_kernels(name):
    """The mask of each shipped config: every network ``kernel`` and nothing else (biases, norm scales,
    embeddings, the schedule). This is the mask the trainer had when it chose by a parameter type
    that the layer helpers set, so old runs train on as they did."""
    config = configs.get(name)
    model = nnx.eval_shape(lambda: VDM.from_config(config, image_shape=SHAPES[name], vocab_size=256,
                                                   rngs=nnx.Rngs(0)))
    mask = weight_decay.decay_mask(model)
    assert jax.tree.structure(mask) == jax.tree.structure(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    decayed = flat(mask)
    assert any(decayed.values())
    assert any("schedule" in k for k in decayed) == bool(jax.tree.leaves(nnx.state(model.schedule, nnx.Param)))
    for key, value in decayed.items():
        # MuLAN's q(c | x) and DiffEnc's mean encoder are networks too
        networks = any(key.startswith(f"['{part}']") for part in ("network", "latent_encoder", "mean_encoder"))
        assert value == (networks and key.endswith("['kernel']")), key


class Handmade(nnx.Module):
    """Layers built without any helper of ``vdm.nets``, and look-alikes that are no weight matrix."""

    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 4, rngs=rngs)
        self.conv = nnx.Conv(4, 4, kernel_size=(3, 3), rngs=rngs)
        self.stack = nnx.List([nnx.Linear(4, 4, use_bias=False, rngs=rngs), nnx.LayerNorm(4, rngs=rngs)])
        self.embed = nnx.Embed(5, 4, rngs=rngs)
        self.norm = nnx.GroupNorm(4, num_groups=2, rngs=rngs)
        self.kernel = nnx.Param(jax.numpy.ones((2, 2)))  # named "kernel", but in no layer


def test_decay_goes_by_the_layer_not_the_helper_that_built_it():
    mask = flat(weight_decay.decay_mask(nnx.eval_shape(lambda: Handmade(nnx.Rngs(0)))))
    assert {k for k, v in mask.items() if v} == {"['linear']['kernel']", "['conv']['kernel']", "['stack'][0]['kernel']"}
    assert "['linear']['bias']" in mask and "['embed']['embedding']" in mask and "['kernel']" in mask
