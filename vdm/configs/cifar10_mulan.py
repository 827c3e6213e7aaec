"""CIFAR-10 in the setting of MuLAN (Sahoo et al., NeurIPS 2024, "Diffusion Models With Learned Adaptive Noise";
their ldm/configs/cifar10-conditioned.py).

    python -m vdm.main --config configs/cifar10_mulan.py --workdir workdirs/cifar10_mulan \
        --config.data.kwargs.path=/path/to/cifar-10-python.tar.gz

configs/cifar10.py (VDM's U-Net, 32 blocks of 128 channels, dropout 0.1, AdamW 2e-4, b2 0.99, weight decay 0.01,
EMA 0.9999, batch 128) with MuLAN's noise: an auxiliary latent of 50 dimensions, the per-pixel polynomial schedule
gamma(c, t) from a network of width 3,072 with its endpoints fixed at [-13.3, 5] (their ``poly_fixedend``), the
denoiser conditioned on c; 10 million steps, as their config.
Differs from theirs: c is Gaussian (their best is a top-k latent of 50 with 15 active, with Gamma noise) and its
encoder an MLP (theirs a small U-Net).
Paper: 2.55 bits/dim without data augmentation.
GPU time predicted by ``python -m vdm.bench``: not measured yet (no session with a GPU since this config was
written; ``experiments/performance/gpu.sh`` gives the step time, and the time is steps x step time).
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "cifar10.py"))
    c.model.schedule = "latent_polynomial"
    c.model.schedule_kwargs = {"hidden": 3072, "learn_endpoints": False}
    c.model.latent_size = 50
    c.model.latent_encoder = "mlp"
    c.model.latent_encoder_kwargs = {"hidden": 512, "depth": 2}
    c.train.warmup_steps = 100
    return c
