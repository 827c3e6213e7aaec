"""configs/mnist.py with MuLAN's learned adaptive noise (Sahoo et al. 2024, "Diffusion Models With Learned Adaptive
Noise"): a noise schedule per pixel, conditioned on an auxiliary latent c of the input, trained on the ELBO.

    python -m vdm.main --config configs/mnist_mulan.py --workdir workdirs/mnist_mulan

What differs from configs/mnist.py:
- ``model.latent_size = 16``: c ~ q(c | x) = N(mu(x), diag s(x)^2) from an MLP encoder (``vdm/latent.py``;
  MuLAN's is a small U-Net and its best latent a top-k one: a Gaussian c is the option its paper also gives);
  the bound gains KL(q(c | x) || N(0, I)), reported as ``bpd_latent`` (part of ``bpd_prior``);
- ``model.schedule = "latent_polynomial"``: gamma(c, t) per pixel, MuLAN's monotone degree-5 polynomial with
  coefficients from a network of c and learned per-pixel endpoints (``vdm/schedules/polynomial.py``);
- the denoiser is conditioned on c (added to its noise embedding) and, as for every per-pixel schedule, takes
  the map of gamma as input channels;
- ``loss.weighting = "elbo"``: MuLAN trains the bound itself (the per-pixel schedule then has a gradient from
  the diffusion term, which the learned interior of a scalar schedule does not).

The bound reported is KL(q(c | x) || N(0, I)) + the VLB of x given c, one c per test image; with
``eval.method = "ode"`` it is the KL + the probability-flow ODE's dequantised bound given c.
Samples draw c from N(0, I).
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "mnist.py"))
    c.model.schedule = "latent_polynomial"
    c.model.schedule_kwargs = {"hidden": 64}
    c.model.latent_size = 16
    c.model.latent_encoder = "mlp"
    c.model.latent_encoder_kwargs = {"hidden": 128, "depth": 2}
    c.loss.weighting = "elbo"
    c.loss.weighting_kwargs = {}
    return c
