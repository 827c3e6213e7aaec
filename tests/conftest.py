"""Helpers shared by the tests: configs, subprocess runs, free ports, compile counts."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The persistent compilation cache ("auto" = $XDG_CACHE_HOME/vdm/jax) of the suite's runs, in-process
# and in subprocesses, starts empty and is not the user's: a fresh clone's timing, nothing left behind.
# The first process (pytest, or pytest-xdist's controller) makes it; the workers it starts inherit the
# variable and share the cache, so a program compiled by one worker is not compiled again by the other.
if "VDM_TESTS_CACHE_HOME" not in os.environ:
    os.environ["VDM_TESTS_CACHE_HOME"] = tempfile.mkdtemp(prefix="vdm-tests-cache-")
    atexit.register(shutil.rmtree, os.environ["VDM_TESTS_CACHE_HOME"], ignore_errors=True)
os.environ["XDG_CACHE_HOME"] = os.environ["VDM_TESTS_CACHE_HOME"]

# XLA:CPU at its lowest backend optimisation level, in-process and in every subprocess (`xla_flags`):
# the suite mostly compiles tiny programs and runs them a few times, and this halves a compile
# (a small U-Net's train step: 11 s -> 5 s) for slower runs of the few long trainings. Whole suite on
# 2 cores, 2026-12-04: 767 s -> 669 s. What the tests check must hold at any optimisation level.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a test's subprocess: the suite's (``FAST_COMPILE``) and ``flags``."""
    return " ".join((FAST_COMPILE, *flags))


if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", "")).strip()


def load_config(name: str = "test"):
    """The shipped config ``vdm/configs/<name>.py``'s ``get_config()``."""
    from vdm import configs

    return configs.get(name)


def config_names() -> list[str]:
    from vdm import configs

    return list(configs.CONFIGS)


def parse_command_line(argv, define=None):
    """(config, workdir, mode, notes) of ``python -m vdm.main <argv>``, parsed in-process as the command line
    parses it (``define``: another program's flag definitions, default ``vdm.main.define_flags``)."""
    from absl import flags

    from vdm import main

    argv = ["vdm.main", *argv]
    fv = flags.FlagValues()
    (define or main.define_flags)(fv, argv)
    main.parse(argv, fv)
    return main.resolve(fv)


def run_python(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """``python ARGS`` in the repository root on the CPU, output captured as text."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compile_count(jitted) -> int:
    """How many times a ``jax.jit`` function has been compiled (its cache entries)."""
    return jitted._cache_size()


@pytest.fixture
def tfds(monkeypatch):
    """``tensorflow_datasets`` with ``mock_data``'s batched reads made to work.

    tfds 4.9's ``mock_data`` installs ``__getitems__`` on the mocked
    array_record source as ``functools.partial(_getitems, generator=...)``
    without binding ``self``, so every batched read fails with "missing 1
    required positional argument: 'record_keys'". Replace the helper with one
    that takes the record keys as its last positional argument, which is
    right whether or not ``self`` is passed.
    """
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.testing import mocking

    def getitems(*args, generator, serialized=False):
        assert not serialized
        return [generator[key] for key in args[-1]]

    monkeypatch.setattr(mocking, "_getitems", getitems)
    return tfds


def pytest_collection_modifyitems(config, items):
    """The slow tests first (stable otherwise). pytest-xdist hands out tests in this order, so the longest
    start early and the suite does not end with one worker on a long test while the other idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def digits_cond(tmp_path_factory):
    """(config, workdir, result): configs/digits_cond.py's conditional model, trained briefly (300 steps)
    on the 8x8 digits with a residual MLP in place of its U-Net.

    The MLP learns the classes at this budget as well as the U-Net does (samples recognised: 0.48 to
    0.62 unguided, 0.98 to 1.0 at w = 3, three seeds) and trains in a fifth of its time (22 s against
    100 s). Session-scoped, and the tests using it (test_model, test_scoring) share an xdist group, so it is
    trained once: by the command line in a subprocess at XLA's default optimisation level, where 300 steps
    run faster than at the suite's (conftest.FAST_COMPILE)."""
    from vdm import configlib

    overrides = {"model.network": "mlp", "model.network_kwargs": {"hidden": 256, "depth": 4},
                 "train.num_steps": 300, "train.checkpoint_every": 300, "eval.num_examples": 32,
                 "sample.num_images": 10, "sample.steps": 64}
    config, _ = configlib.override(load_config("digits_cond"), overrides)
    workdir = str(tmp_path_factory.mktemp("digits_cond") / "run")
    run = run_python(["-m", "vdm.main", "--config", "configs/digits_cond.py", "--workdir", workdir]
                     + [f"--config.{key}={value}" for key, value in overrides.items()], env={"XLA_FLAGS": ""}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return config, workdir, json.loads(run.stdout.strip().splitlines()[-1])
