"""Downsampled ImageNet 32x32 (van den Oord et al. 2016) as in the VDM paper.

    python -m vdm.main --config configs/imagenet32.py --workdir workdirs/imagenet32 \
        --config.data.kwargs.data_dir=/path/to/tensorflow_datasets

Data: tensorflow-datasets "downsampled_imagenet/32x32", read as array_record through
tfds.data_source (prepare it beforehand; no download at run time); test = validation split.
Model: the VDM U-Net, 32 blocks of 256 channels, attention off, dropout 0; learned schedule.
Expected: the paper reports 3.72 bits/dim (test); not reproduced here. Hardware: a TPU pod slice / multi-GPU node.
"""
from vdm import configlib


def get_config():
    c = configlib.base_config()
    c.data.source = "tfds_imagenet32"
    c.model.schedule = "monotone_net"
    c.model.network = "unet"
    c.model.network_kwargs.channels = 256
    c.model.network_kwargs.num_blocks = 32
    c.model.network_kwargs.attention = False
    c.model.network_kwargs.dropout = 0.0
    c.model.network_kwargs.scan_blocks = True
    c.train.num_steps = 2_000_000
    c.train.batch_size = 512
    c.train.steps_per_call = 10
    c.train.log_every = 1000
    c.train.eval_every = 100_000
    c.train.checkpoint_every = 10_000
    c.train.lr = 2e-4
    c.train.warmup_steps = 1000
    c.eval.batch_size = 512
    return c
