"""``compress`` and ``decompress`` with the model of a workdir: its latest checkpoint's EMA parameters, loaded as
``vdm.image_bpd`` loads them (``vdm.train.restored_trainer``)."""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx

from vdm import image_bpd, model as model_lib, train
from vdm.codec import DEFAULT_BATCH_SIZE, Grid, Pieces, _check_num_steps, compress_with, decompress_with, \
    params_fingerprint
from vdm.codec import format as format_lib
from vdm.codec.format import CodecError


def _pieces(config, workdir: str, check_data=None) -> Pieces:
    """The ``Pieces`` of ``workdir``'s latest checkpoint (EMA parameters), on the CPU."""
    trainer = train.restored_trainer(config, workdir, check_data=check_data)
    try:
        params = jax.device_put(jax.device_get(trainer.state.ema_params), jax.devices("cpu")[0])
        step, info = int(trainer.state.step), trainer.dataset.info
        model = nnx.merge(trainer.graphdef, params)
    finally:
        trainer.close()
    if model.latent_size or model.mean_encoder is not None:
        raise CodecError("the codec does not support models with an auxiliary latent (MuLAN) or a mean encoder "
                         "(DiffEnc)")
    eps_fn, gamma_fn = model_lib.pure_functions(model)
    return Pieces(eps_fn, gamma_fn, info.vocab_size, tuple(info.shape), model.num_classes,
                  params_fingerprint(params), step)


def compress(config, workdir: str, images, *, num_steps: int, labels=None, grid: Grid = Grid(),
             batch_size: int = DEFAULT_BATCH_SIZE, stats: dict | None = None) -> bytes:
    """The ``.vdmz`` bytes of ``images`` under ``workdir``'s latest checkpoint (EMA parameters), T = ``num_steps``.

    Args:
        config: a ConfigDict, or a shipped config's name or file (``vdm.train.resolve_config``).
        workdir: the trained run's directory.
        images: as ``--mode score`` takes them (``vdm.image_bpd.read_images``): an ``.npz`` path, a folder of PNG
            files, a uint8 array [N, H, W, C] or ``{"images", "labels"}``.
        num_steps: T >= 1.
        labels: int [N], the classes for a conditional model (beside an array ``images``).
        grid, batch_size, stats: as in ``vdm.codec.compress_with``.

    Returns:
        The file's bytes.

    Raises:
        CodecError: num_steps not positive (before anything is loaded), a latent the model cannot code.
        vdm.data.DataError: images that do not fit the model (before anything is compiled).
    """
    _check_num_steps(num_steps)
    config = train.resolve_config(config)
    read: dict[str, Any] = {}
    if labels is not None and not isinstance(images, (str, os.PathLike, dict)):
        images = {"images": images, "labels": labels}

    def check(info):
        read["source"], _ = image_bpd.read_images(images, info, config.model.num_classes)

    pieces = _pieces(config, workdir, check)
    source = read["source"]
    return compress_with(pieces, np.asarray(source.images), num_steps, labels=source.labels, grid=grid,
                         batch_size=batch_size, stats=stats)


def decompress(config, workdir: str, data) -> np.ndarray:
    """The images (uint8 [N, H, W, C]) of a ``.vdmz`` file, decoded with ``workdir``'s latest checkpoint.

    Args:
        config: as in ``compress``.
        workdir: the run whose model compressed them.
        data: the file's bytes, or its path.

    Returns:
        The images, bit for bit those compressed.

    Raises:
        CodecError: not a ``.vdmz`` file, a newer format version, a truncated or altered file (checked before the
            model is loaded), another model or step, images that fail their checksum.
    """
    if isinstance(data, (str, os.PathLike)):
        with open(data, "rb") as f:
            data = f.read()
    format_lib.unpack(data)  # a bad file is one line before anything is loaded
    return decompress_with(_pieces(train.resolve_config(config), workdir), data)
