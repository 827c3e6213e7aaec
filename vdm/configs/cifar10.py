"""CIFAR-10 in the setting of the VDM paper (Kingma et al. 2021, Sec. 6 and App. B).

    python -m vdm.main --config configs/cifar10.py --workdir workdirs/cifar10 \
        --config.data.kwargs.path=/path/to/cifar-10-python.tar.gz
    python -m vdm.main --config configs/cifar10.py --workdir workdirs/cifar10 \
        --config.data.source=tfds_cifar10 --config.data.kwargs.data_dir=/path/to/tensorflow_datasets

Data: the official CIFAR-10 archive (python or binary version) at data.kwargs.path, or
tensorflow-datasets (the second command: array_record data prepared beforehand with
``tfds build cifar10 --file_format=array_record``; nothing is downloaded at run time; the
file's data.kwargs.path is dropped, with a note, because tfds_cifar10 does not take it).
Model: learned monotone schedule on gamma in [-13.3, 5]; the full-resolution VDM U-Net,
32 residual blocks of 128 channels (scanned), dropout 0.1, no attention; continuous-time
ELBO with low-discrepancy times. AdamW lr 2e-4, b2 0.99, weight decay 0.01, EMA 0.9999,
batch 128.
Expected: the paper reports 2.65 bits/dim (test VLB, no data augmentation) after training
for millions of steps on a TPU pod slice; this has not been reproduced here (no accelerator
was available). Hardware: a multi-GPU node or a TPU pod slice; not a CPU config.
"""
from vdm import configlib


def get_config():
    c = configlib.base_config()
    c.seed = 0
    c.data.source = "cifar10_files"
    c.data.kwargs.path = "data/cifar-10-python.tar.gz"
    c.model.schedule = "monotone_net"
    c.model.schedule_kwargs.hidden = 1024
    c.model.gamma_min = -13.3
    c.model.gamma_max = 5.0
    c.model.network = "unet"
    c.model.network_kwargs.channels = 128
    c.model.network_kwargs.num_blocks = 32
    c.model.network_kwargs.attention = False
    c.model.network_kwargs.dropout = 0.1
    c.model.network_kwargs.scan_blocks = True
    c.train.num_steps = 10_000_000
    c.train.batch_size = 128
    c.train.steps_per_call = 10  # the paper code's "substeps"
    c.train.log_every = 1000
    c.train.eval_every = 100_000
    c.train.checkpoint_every = 10_000
    c.train.lr = 2e-4
    c.train.warmup_steps = 1000
    c.train.b2 = 0.99
    c.train.weight_decay = 0.01
    c.train.ema_decay = 0.9999
    c.eval.batch_size = 512
    c.sample.steps = 1000
    return c
