"""CIFAR-10 in the setting of i-DODE (Zheng et al., ICML 2023, "Improved Techniques for Maximum Likelihood
Estimation for Diffusion ODEs"; their configs/cifar10.py).

    python -m vdm.main --config configs/cifar10_idode.py --workdir workdirs/cifar10_idode \
        --config.data.kwargs.path=/path/to/cifar-10-python.tar.gz

configs/cifar10.py (VDM's U-Net, 32 blocks of 128 channels, dropout 0.1, AdamW 2e-4, b2 0.99, weight decay 0.01,
EMA 0.9999, batch 128) with i-DODE's training: the velocity parameterisation, the ELBO with lambda importance-
sampled by alpha^2 (``loss.importance_sampling = "weighting"``), a fixed linear schedule on [-13.3, 5], warm-up
100 steps, 6 million steps; evaluated by the VLB and by the probability-flow ODE with the truncated-normal
dequantisation.
Paper: 2.56 bits/dim by the ODE without data augmentation (2.42 with), after its flow-matching fine-tuning stage,
which this library does not have yet.
GPU time predicted by ``python -m vdm.bench``: not measured yet (no session with a GPU since this config was
written; ``experiments/performance/gpu.sh`` gives the step time, and the time is steps x step time).
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "cifar10.py"))
    c.model.prediction = "v"
    c.model.schedule = "fixed_linear"
    c.model.schedule_kwargs = {}
    c.loss.importance_sampling = "weighting"
    c.train.num_steps = 6_000_000
    c.train.warmup_steps = 100
    c.eval.method = "both"
    c.eval.ode.dequantization = "truncated_normal"
    return c
