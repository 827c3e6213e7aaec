"""vdm: continuous-time Variational Diffusion Models and the weighted-ELBO family in JAX/Flax."""
__version__ = "0.1.0"
