"""configs/mnist.py trained by i-DODE's recipe (Zheng et al. 2023, "Improved Techniques for Maximum Likelihood
Estimation for Diffusion ODEs"): the velocity parameterisation, trained on the ELBO with its noise level
importance-sampled so that every example's velocity error has one weight.

    python -m vdm.main --config configs/mnist_idode.py --workdir workdirs/mnist_idode

What differs from configs/mnist.py:
- ``model.prediction = "v"``: the network outputs v = alpha eps - sigma x (``vdm/predictions.py``);
- ``loss.weighting = "elbo"`` and ``loss.importance_sampling = "weighting"``: lambda = log SNR is drawn
  with density proportional to alpha^2 = sigmoid(lambda) (w b^2 with w = 1, b = alpha; ``vdm.objective``),
  i-DODE's importance sampling, so the loss is 0.5 Z ||v - v_hat||^2 with one Z for every example;
- a fixed linear schedule on [-13.3, 5] (i-DODE's): importance sampling draws lambda itself, so a learned
  interior would get no gradient;
- ``eval.method = "both"``: the VLB and the probability-flow ODE's bound, side by side (i-DODE's
  truncated-normal dequantisation is ``--config.eval.ode.dequantization=truncated_normal``).

Measured (2-core CPU, 3,500 steps, 9.5 min on a shared machine): test 2.00 +- 0.07 bits/dim by the VLB over
the 500 test digits (configs/mnist.py: 2.37); FD-MNIST 30.8 over 64 samples (configs/mnist.py: 25.7). On the
first 50 test digits the probability-flow ODE gives 2.81 bits/dim with the truncated normal, 3.38 with the
uniform dequantisation (experiments/likelihood/README.md).

The second stage of the recipe, fine-tuning with the second-order term, is configs/mnist_idode_finetune.py;
not here: i-DODE's data augmentation.
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "mnist.py"))
    c.model.prediction = "v"
    c.model.schedule = "fixed_linear"
    c.model.schedule_kwargs = {}
    c.loss.weighting = "elbo"
    c.loss.weighting_kwargs = {}
    c.loss.importance_sampling = "weighting"
    c.eval.method = "both"
    c.eval.num_examples = 100  # the ODE bound: about 650 network evaluations per batch
    return c
