"""vdm: continuous-time Variational Diffusion Models and the weighted-ELBO family in JAX/Flax.

From Python (a notebook): ``vdm.train.train_and_evaluate("mnist", workdir, overrides={...})``
trains, evaluates and samples, and returns the final metrics; ``vdm.configs`` holds the shipped
configs (``vdm.configs.get("mnist")``). The command line is ``python -m vdm.main``.
"""
__version__ = "0.1.0"
