"""configs/mnist.py with DiffEnc's learned time-dependent encoder of the mean (Nielsen et al., ICLR 2024, "DiffEnc:
Variational Diffusion with a Learned Encoder"), trained on the ELBO.

    python -m vdm.main --config configs/mnist_diffenc.py --workdir workdirs/mnist_diffenc

What differs from configs/mnist.py:
- ``model.mean_encoder = "mlp"``: z_t = alpha_t m(x, gamma_t) + sigma_t eps with m = f + sigma_t^2 y(f, gamma_t),
  y a residual MLP of the data and the noise level (``vdm/moving_mean.py``; DiffEnc's own encoder is a U-Net:
  ``--config.model.mean_encoder=multires_unet`` with its ``mean_encoder_kwargs`` takes one). The bound gains the
  moving mean's term; the denoiser's prediction is encoded at both ends of each reverse step (DiffEnc's p(z_s |
  z_t) = q(z_s | z_t, x = x_hat)), so the model is still an eps-model and every sampler and the ODE take it;
- ``loss.weighting = "elbo"``: the bound with a moving mean is derived for the elbo (``vdm.moving_mean.check``).

Untrained, the encoder is the identity and the model is configs/mnist.py's on the elbo, term for term.
"""
import os

from vdm import configlib


def get_config():
    c = configlib.load_file(os.path.join(os.path.dirname(__file__), "mnist.py"))
    c.model.mean_encoder = "mlp"
    c.model.mean_encoder_kwargs = {"hidden": 256, "depth": 2}
    c.loss.weighting = "elbo"
    c.loss.weighting_kwargs = {}
    return c
