"""Class-conditional VDM on the embedded MNIST digits, with classifier-free guidance.

    python -m vdm.main --config configs/mnist_cond.py --workdir workdirs/mnist_cond
    python -m vdm.main --config configs/mnist_cond.py --workdir workdirs/mnist_cond --mode sample \
        --config.sample.guidance=3.0
    python scripts/class_accuracy.py --config configs/mnist_cond.py --workdir workdirs/mnist_cond

The demo's data and network (configs/mnist.py) with the demo's previous training, not today's: the sigmoid
weighting at bias 2 (the demo's is 8), 2,500 steps at a constant learning rate (the demo's: 3,500 with a cosine
decay); the setting in which the figures below were measured, kept so that they stay true. Added: a learned
class embedding in the noise-level conditioning (model.num_classes=10) and label dropout 0.1: the null class
trains the unconditional model that classifier-free guidance (Ho & Salimans 2022) subtracts,
eps = (1 + w) eps(z, y) - w eps(z, null). The sample grid has one column per class.
Evaluation reports the conditional bound -log p(x | y) in bits/dim.

Measured (2-core CPU shared with other work, 2,500 steps, 7.3 min for the whole run): a
logistic regression fitted on the 4,500 training digits (90.2% on the 500 test digits); test
conditional bound 4.76 bits/dim. The classifier
recognises the requested class in 500 samples (scripts/class_accuracy.py):

    guidance w      0       1       3
    accuracy        68.0%   93.0%   97.4%     (chance: 10%)
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "mnist.py"))
    # The demo's setting when this config was measured (the figures above): the sigmoid weighting at
    # its default bias 2, 2,500 steps at a constant learning rate.
    c.loss.weighting_kwargs.bias = 2.0
    c.train.num_steps = 2500
    c.train.lr_schedule = "constant"
    c.model.num_classes = 10
    c.loss.label_dropout = 0.1
    c.sample.num_images = 100
    c.sample.guidance = 1.0
    return c
