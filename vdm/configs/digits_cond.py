"""Class-conditional VDM on scikit-learn's 8x8 digits, with classifier-free guidance.

    python -m vdm.main --config configs/digits_cond.py --workdir workdirs/digits_cond
    python -m vdm.main --config configs/digits_cond.py --workdir workdirs/digits_cond --mode sample \
        --config.sample.guidance=2.0 --config.sample.labels=(3,)

configs/digits.py with a class embedding added to the noise-level conditioning
(model.num_classes=10), label dropout 0.1 (the null class trains the unconditional
model that guidance needs) and the sigmoid weighting (clean samples at this budget, as in
configs/mnist.py). Samples come in columns 0..9; evaluation reports the conditional bound
-log p(x | y) in bits/dim.

Measured (2-core CPU, 2,000 steps, 3.2 min for the whole run): test 3.59 bits/dim
(conditional, 17 levels). A logistic regression fitted on the training digits (98.3% on the
test digits) recognises the requested class in 500 samples (scripts/class_accuracy.py):

    guidance w      0       1       3
    accuracy        96.2%   99.8%   100%      (chance: 10%)
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "digits.py"))
    c.model.num_classes = 10
    c.loss.weighting = "sigmoid"  # clean samples at a CPU budget, as in configs/mnist.py
    c.loss.label_dropout = 0.1
    c.sample.num_images = 100
    c.sample.guidance = 1.0
    return c
