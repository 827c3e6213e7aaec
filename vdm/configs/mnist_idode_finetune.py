"""Stage 2 of i-DODE's recipe on MNIST: configs/mnist_idode.py fine-tuned with its second-order term (Zheng et al.
2023, Sec. 4.2), which trains the divergence of the velocity field that the ODE's likelihood integrates.

    python -m vdm.main --config configs/mnist_idode.py --workdir workdirs/mnist_idode                     # stage 1
    cp -r workdirs/mnist_idode workdirs/mnist_idode_finetune                                             # keep it
    python -m vdm.main --config configs/mnist_idode_finetune.py --workdir workdirs/mnist_idode_finetune  # stage 2

Stage 2 resumes stage 1's newest checkpoint (the model is the same; the loss, the steps and the learning rate may
change when a run resumes) and trains 1,000 more steps with ``loss.second_order_weight = 0.1`` (i-DODE's value;
``vdm/second_order.py``) at a constant learning rate of 2e-4. Run in stage 1's own workdir it fine-tunes that
run in place. It names stage 1 (``train.continues``): a workdir without a checkpoint is refused in one line
before anything is written, instead of training stage 2 from scratch. What it buys is measured in
experiments/likelihood/README.md.
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "mnist_idode.py"))
    c.train.continues = "mnist_idode"  # stage 1: the workdir must hold its checkpoint
    c.loss.second_order_weight = 0.1
    c.train.num_steps = 4500  # stage 1's 3,500 + 1,000
    c.train.lr = 2e-4
    c.train.lr_schedule = "constant"
    return c
