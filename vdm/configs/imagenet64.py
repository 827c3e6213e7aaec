"""Downsampled ImageNet 64x64 as in the VDM paper: configs/imagenet32.py at 64x64.

    python -m vdm.main --config configs/imagenet64.py --workdir workdirs/imagenet64 \
        --config.data.kwargs.data_dir=/path/to/tensorflow_datasets

Data: tensorflow-datasets "downsampled_imagenet/64x64" through tfds.data_source; test =
validation split. Model: the paper's full-resolution VDM U-Net (32 blocks of 256 channels),
scanned and rematerialised (activations of 64x64 images at 256 channels do not fit otherwise).
Expected: the paper reports 3.40 bits/dim (test); not reproduced here.
Hardware: a TPU pod slice / multi-GPU node with rematerialisation on.
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "imagenet32.py"))
    c.data.source = "tfds_imagenet64"
    c.model.remat = True
    c.eval.batch_size = 256
    return c
