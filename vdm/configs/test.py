"""A tiny config for tests: seconds on one CPU core.

    python -m vdm.main --config configs/test.py --workdir /tmp/vdm_test

Trains 4 steps of a one-block residual MLP (width 32) on scikit-learn's 8x8 digits (17 levels).
Not meant to learn anything: it exercises every part of the pipeline but the convolutions, and
compiles in about a second (a U-Net's train step takes five at the suite's optimisation level).
The networks themselves are tested in tests/test_nets.py; for a U-Net here, add
``--config.model.network=unet``.
"""
from vdm import configlib


def get_config():
    c = configlib.base_config()
    c.seed = 0
    c.data.source = "sklearn_digits"
    c.model.schedule = "monotone_net"
    c.model.schedule_kwargs.hidden = 16
    c.model.network = "mlp"
    c.model.network_kwargs.hidden = 32
    c.model.network_kwargs.depth = 1
    c.model.network_kwargs.dropout = 0.1
    c.train.num_steps = 4
    c.train.batch_size = 16
    c.train.log_every = 2
    c.train.eval_every = 4
    c.train.checkpoint_every = 2
    c.train.warmup_steps = 2
    c.eval.batch_size = 64
    c.eval.num_examples = 100
    c.sample.steps = 8
    c.sample.num_images = 16
    return c
