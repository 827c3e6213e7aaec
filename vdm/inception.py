"""FID: the Fréchet distance of InceptionV3 pool3 features (Heusel et al. 2017, arXiv 1706.08500).

The network is the TensorFlow graph ``inception-2015-12-05`` that the original FID code used,
as Seitzer's pytorch-fid ports it (github.com/mseitzer/pytorch-fid, ``inception.py``):
torchvision's InceptionV3 layer for layer, with the FID variants of its blocks (Mixed_5b-d
``FIDInceptionA``, Mixed_6b-e ``FIDInceptionC``, Mixed_7b ``FIDInceptionE_1``: the branch
average pool leaves the padding out of the mean, ``count_include_pad=False``; Mixed_7c
``FIDInceptionE_2``: a max pool there instead), BatchNorm with eps 1e-3 in inference mode.

Input: images ``[N, H, W]`` or ``[N, H, W, C]`` (C = 1 or 3), uint8 or float with values in
``[0, max_value]`` (255), of any size: scaled to [0, 1], resized bilinearly to 299 x 299 as
``F.interpolate(..., align_corners=False)`` does (no antialiasing), mapped to [-1, 1]; grey
repeated to RGB. Output: the 2048 features of the final average pool ("pool3").

The weights are pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (``URL``), which the
user downloads: nothing is downloaded here. torch is not a dependency, so they are read from
an ``.npz`` whose keys are the state-dict names (``scripts/convert_inception_weights.py`` writes
it), or from the ``.pth`` itself where torch happens to be installed. The attributes of the
modules are named as in the state dict, so the two name spaces map one to one
(``_LEAVES``). FID is comparable with published figures only with these weights (and
pytorch-fid's resize; the original TF code resized slightly differently).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import io
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from vdm import metrics, paths
from vdm.inception_net import (BN_EPS, ConvBN, FIDInceptionV3, InceptionA, InceptionB, InceptionC,  # noqa: F401
                                InceptionD, InceptionE, avg_pool_valid, max_pool)

URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
SIZE = 299  # input side of the network
FEATURES = 2048  # pool3


class WeightsError(ValueError):
    """The Inception weights are missing or malformed; the message is one line naming the file and what to do."""


def how_to_get_weights() -> str:
    """What to download and how to convert it (one line)."""
    pth = URL.rsplit("/", 1)[1]
    return (f"download {URL} and convert it with `python scripts/convert_inception_weights.py {pth} "
            "inception-2015-12-05.npz` (needs torch), or give the .pth itself where torch is installed")


# The network: vdm/inception_net.py (re-exported here).


# --------------------------------------------------------------------------------------
# Weights: pytorch-fid's state-dict names <-> the Flax parameter tree
# --------------------------------------------------------------------------------------

# State-dict suffix -> (the last two names of the Flax path, the axes of the torch array in Flax's layout).
_LEAVES = types.MappingProxyType({
    "conv.weight": (("conv", "kernel"), (2, 3, 1, 0)),  # OIHW -> HWIO
    "bn.weight": (("bn", "scale"), None),
    "bn.bias": (("bn", "bias"), None),
    "bn.running_mean": (("bn", "mean"), None),
    "bn.running_var": (("bn", "var"), None),
})
_SUFFIX = types.MappingProxyType({flax: name for name, (flax, _) in _LEAVES.items()})


def _names(state) -> dict[tuple, tuple[str, tuple | None]]:
    """Flax path -> (state-dict name, the torch -> Flax axis permutation) for every array of a network state."""
    out = {}
    for path in traverse_util.flatten_dict(nnx.to_pure_dict(state)):
        suffix = _SUFFIX[tuple(path[-2:])]
        out[path] = (".".join(map(str, path[:-2])) + "." + suffix, _LEAVES[suffix][1])
    return out


@functools.cache
def _abstract():
    """(graphdef, state) of the network with shapes only: nothing is initialised."""
    return nnx.split(nnx.eval_shape(lambda: FIDInceptionV3(rngs=nnx.Rngs(0))))


def to_state_dict(net: FIDInceptionV3) -> dict[str, np.ndarray]:
    """The network's arrays under pytorch-fid's state-dict names, in torch's layout."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(net)))
    return {name: np.asarray(flat[path]).transpose(np.argsort(axes)) if axes else np.asarray(flat[path])
            for path, (name, axes) in _names(nnx.state(net)).items()}


@functools.cache
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Every state-dict name the network needs, with its shape in torch's layout (OIHW kernels)."""
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(_abstract()[1]))
    return {name: tuple(int(flat[path].shape[i]) for i in np.argsort(axes)) if axes else tuple(flat[path].shape)
            for path, (name, axes) in _names(_abstract()[1]).items()}


def check_state_dict(state_dict, origin: str) -> None:
    """WeightsError naming the first missing or mismatched name; names the network does not use are ignored."""
    for name, shape in expected_shapes().items():
        if name not in state_dict:
            raise WeightsError(f"{origin}: no array {name!r} (of shape {shape}); is it pytorch-fid's "
                               f"pt_inception-2015-12-05 state dict? {how_to_get_weights()}")
        if tuple(np.shape(state_dict[name])) != shape:
            raise WeightsError(f"{origin}: {name!r} has shape {tuple(np.shape(state_dict[name]))}, expected {shape}")


def from_state_dict(state_dict, origin: str = "state dict") -> FIDInceptionV3:
    """The network with the arrays of a pytorch-fid state dict (checked first)."""
    check_state_dict(state_dict, origin)
    graphdef, abstract = _abstract()
    state = jax.tree.map(lambda x: x, abstract)  # a copy, filled below
    flat = {}
    for path, (name, axes) in _names(state).items():
        value = np.asarray(state_dict[name], np.float32)
        flat[path] = jnp.asarray(value.transpose(axes) if axes else value)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(flat))
    return nnx.merge(graphdef, state)


@dataclasses.dataclass(frozen=True)
class Weights:
    """A checked state dict (numpy, torch layout) and the SHA-256 of the file it came from."""

    state_dict: dict
    sha256: str

    @functools.cached_property
    def network(self) -> FIDInceptionV3:
        """The network with these weights (built once)."""
        return from_state_dict(self.state_dict)


def weights_problem(path: str) -> str | None:
    """Why ``path`` cannot be read as Inception weights without opening it (None: it can be tried)."""
    if not paths.path(path).exists():
        return f"no such file: {how_to_get_weights()}"
    suffix = os.path.splitext(os.fspath(path))[1]
    if suffix not in (".npz", ".pth"):
        return f"expected an .npz of pytorch-fid's state dict (or its .pth), not a {suffix or 'suffix-less'} file"
    if suffix == ".pth" and not _has_torch():
        return ("reading a .pth needs torch, which is not installed: convert it elsewhere with `python "
                "scripts/convert_inception_weights.py FILE.pth FILE.npz` and give the .npz")
    return None


def _has_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


def load_weights(path: str) -> Weights:
    """The Inception weights at ``path`` (.npz of state-dict names, or .pth with torch), checked."""
    problem = weights_problem(path)
    if problem is not None:
        raise WeightsError(f"{path}: {problem}")
    raw = paths.path(path).read_bytes()
    try:
        if os.fspath(path).endswith(".pth"):
            import torch  # optional: only a .pth needs it (not a dependency of vdm)

            loaded = torch.load(io.BytesIO(raw), map_location="cpu")
            state_dict = {k: v.numpy() for k, v in loaded.items() if hasattr(v, "numpy")}
        else:
            with np.load(io.BytesIO(raw), allow_pickle=False) as saved:
                state_dict = {k: saved[k] for k in saved.files}
    except Exception as e:  # a truncated or foreign file: one line, whatever the reader raised
        raise WeightsError(f"{path}: not readable as a state dict ({type(e).__name__}: {' '.join(str(e).split())})") from e
    check_state_dict(state_dict, os.fspath(path))
    return Weights({k: state_dict[k] for k in expected_shapes()}, hashlib.sha256(raw).hexdigest())


def save_npz(path: str, state_dict) -> None:
    """Write the network's arrays of ``state_dict`` as an .npz (the format ``load_weights`` reads)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{k: np.asarray(state_dict[k], np.float32) for k in expected_shapes()})
    paths.write_bytes(path, buffer.getvalue())


# --------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------


def preprocess(images, max_value: float = 255.0):
    """Images [N, H, W(, C)] with values in [0, max_value] -> float32 [N, 299, 299, 3] in [-1, 1], as pytorch-fid:
    to [0, 1], bilinear resize (align_corners=False, no antialiasing), 2 x - 1; grey repeated to RGB."""
    x = jnp.asarray(images, jnp.float32) / max_value
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (SIZE, SIZE):
        x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


_preprocess = jax.jit(preprocess, static_argnums=1)


@functools.partial(jax.jit, static_argnums=0)
def _pool3(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def features(net: FIDInceptionV3, images, *, batch_size: int = 100, max_value: float = 255.0,
             progress_title: str | None = None) -> np.ndarray:
    """Pool3 features [N, 2048] (float32) of ``images``, ``batch_size`` at a time.

    ``images``: an array [N, H, W(, C)] with values in [0, max_value], or a ``vdm.data`` source
    (read a batch at a time). Every batch is padded to ``batch_size``: one compilation per size.
    ``progress_title``: print it, then a progress bar over the batches (``vdm.metrics.Progress``).
    """
    graphdef, state = nnx.split(net)
    n = len(images)
    num_batches = -(-n // batch_size)
    progress = None
    if progress_title is not None and num_batches:
        progress = metrics.Progress(num_batches, log_every=max(1, num_batches // 10), unit="batch")
        progress.log(progress_title)
    out = []
    for i, start in enumerate(range(0, n, batch_size)):
        if progress is not None:
            progress.update(i)
        stop = min(start + batch_size, n)
        chunk = (images.read_batch(range(start, stop))["image"] if hasattr(images, "read_batch")
                 else np.asarray(images[start:stop]))
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
        out.append(np.asarray(_pool3(graphdef, state, _preprocess(chunk, float(max_value))))[:stop - start])
    if progress is not None:
        progress.update(num_batches)
        progress.close()
    return np.concatenate(out) if out else np.zeros((0, FEATURES), np.float32)

