"""Downsampled ImageNet 64x64 as in the VDM paper.

    python -m vdm.main --config configs/imagenet64.py --workdir workdirs/imagenet64 \
        --config.data.kwargs.data_dir=/path/to/tensorflow_datasets

Data: tensorflow-datasets "downsampled_imagenet/64x64" through tfds.data_source; test =
validation split. Model: the paper's full-resolution VDM U-Net (32 blocks of 256 channels),
scanned and rematerialised. Expected: the paper reports 3.40 bits/dim (test); not reproduced here.
Hardware: a TPU pod slice / multi-GPU node with rematerialisation on.
"""
from vdm import configlib


def get_config():
    c = configlib.base_config()
    c.data.source = "tfds_imagenet64"
    c.model.schedule = "monotone_net"
    c.model.network = "unet"
    c.model.network_kwargs.channels = 256
    c.model.network_kwargs.num_blocks = 32
    c.model.network_kwargs.attention = False
    c.model.network_kwargs.dropout = 0.0
    c.model.network_kwargs.scan_blocks = True
    c.model.network_kwargs.remat = True
    c.train.num_steps = 2_000_000
    c.train.batch_size = 512
    c.train.steps_per_call = 10
    c.train.log_every = 1000
    c.train.eval_every = 100_000
    c.train.checkpoint_every = 10_000
    c.train.lr = 2e-4
    c.train.warmup_steps = 1000
    c.eval.batch_size = 256
    return c
