"""Helpers shared by the tests: configs, subprocess runs, free ports, compile counts."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "test"):
    """``configs/<name>.py``'s ``get_config()``."""
    from vdm import configlib

    return configlib.load_file(os.path.join(ROOT, "configs", f"{name}.py"))


def config_names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))


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
