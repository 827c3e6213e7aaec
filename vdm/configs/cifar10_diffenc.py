"""CIFAR-10 in the setting of DiffEnc (Nielsen et al., ICLR 2024, "DiffEnc: Variational Diffusion with a Learned
Encoder"; their config_model_S3VA_fixed_-13_3_5_0_unet_32_unet_2_m1_to_1.json and config_train_cifar10).

    python -m vdm.main --config configs/cifar10_diffenc.py --workdir workdirs/cifar10_diffenc \
        --config.data.kwargs.path=/path/to/cifar-10-python.tar.gz

configs/cifar10.py (VDM's U-Net, 32 blocks of 128 channels, dropout 0.1, AdamW 2e-4, b2 0.99, weight decay 0.01,
EMA 0.9999, batch 128) with DiffEnc's encoder of the mean: a U-Net of 2 blocks of 64 channels (dropout 0.1) for
y in m = f + sigma^2 y, a fixed linear schedule on [-13.3, 5], no gradient clipping, 8 million steps (the
paper's; their training config's default is 1 million).
Differs from theirs: the encoder's output is not squashed by tanh, and the reverse step encodes the prediction
at both of its times (their "v approx" model approximates that derivative).
Paper: 2.62 bits/dim without data augmentation.
GPU time predicted by ``python -m vdm.bench``: not measured yet (no session with a GPU since this config was
written; ``experiments/performance/gpu.sh`` gives the step time, and the time is steps x step time).
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "cifar10.py"))
    c.model.schedule = "fixed_linear"
    c.model.schedule_kwargs = {}
    c.model.mean_encoder = "unet"
    c.model.mean_encoder_kwargs = {"channels": 64, "num_blocks": 2, "attention": False, "dropout": 0.1}
    c.train.num_steps = 8_000_000
    c.train.grad_clip = 0.0
    return c
