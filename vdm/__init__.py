"""vdm: continuous-time Variational Diffusion Models and the weighted-ELBO family in JAX/Flax.

From Python (a notebook): ``vdm.train.train_and_evaluate("mnist", workdir, overrides={...})``
trains, evaluates and samples, and returns the final metrics; ``vdm.configs`` holds the shipped
configs (``vdm.configs.get("mnist")``). The command line is ``python -m vdm.main``.

Installed as the distribution ``vdm-jax``; ``vdm.__version__`` is its version (from the git tag it
was built at), looked up on first use so that ``import vdm`` stays free of importlib.metadata.
"""
DISTRIBUTION = "vdm-jax"


def __getattr__(name: str):
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import metadata

    try:
        version = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # the sources on sys.path, not installed
        version = "0.0"  # pyproject.toml's fallback_version: no release
    globals()["__version__"] = version
    return version
