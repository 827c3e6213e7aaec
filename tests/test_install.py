"""A non-editable install is a working library: the configs ship inside the package, and a
shipped config trains from outside the repository with nothing of the clone in reach."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from vdm import configs


@pytest.mark.slow
def test_an_installed_wheel_trains_a_shipped_config_from_outside_the_repository(tmp_path):
    # What a build reads, copied: no build/ or egg-info left in the clone, no stale build/ read from it.
    src = tmp_path / "src"
    shutil.copytree(os.path.join(ROOT, "vdm"), src / "vdm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src)
    site = tmp_path / "site"
    # With setuptools at hand (the test extra) the build runs offline; otherwise pip fetches it from PyPI.
    offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *offline, "--target", str(site), str(src)],
                   check=True, capture_output=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"  # not the clone: neither vdm/ nor configs/ in the working directory
    elsewhere.mkdir()
    # PYTHONPATH comes before site-packages, where an editable install's finder would send `import vdm`.
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")

    def python(*args):
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True,
                              timeout=300)

    where = python("-c", "import json, vdm, vdm.configs; print(json.dumps([vdm.__file__, vdm.configs.CONFIGS]))")
    package, shipped = json.loads(where.stdout)
    assert package == str(site / "vdm" / "__init__.py")
    assert shipped == {name: str(site / "vdm" / "configs" / f"{name}.py") for name in configs.CONFIGS}

    # The shipped test config by name, a few steps.
    run = python("-m", "vdm.main", "--config", "test", "--workdir", "run", "--config.train.num_steps=2",
                 "--config.eval.num_examples=16", "--config.eval.batch_size=16",
                 "--config.sample.num_images=4", "--config.sample.num_steps=1")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["step"] == 2 and math.isfinite(result["bpd"]) and result["count"] == 16
    assert (elsewhere / "run" / "checkpoints" / "2").is_dir()
    assert (elsewhere / result["samples"]).is_file()
