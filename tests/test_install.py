"""The release's build is a working library: the sdist and the wheel build offline from a copy of the sources
and pass `twine check`, the wheel carries the package with its configs under the distribution's name, and a
shipped config trains (and scores images) from the installed wheel, outside the repository, with nothing of
the clone in reach.

The build runs once per module (the ``installed`` fixture); ``outside`` runs Python on the installed wheel."""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import types
import zipfile

import numpy as np
import pytest
from conftest import ROOT

from vdm import configs

NAME = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["name"]
VERSION = "1.2.3"  # a version no tag has: the build takes it from SETUPTOOLS_SCM_PRETEND_VERSION
STEM = f"{NAME.replace('-', '_')}-{VERSION}"  # of the file names: vdm_jax-1.2.3.tar.gz, vdm_jax-1.2.3-py3-...

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]  # one worker: one build


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The sdist and the wheel built from a copy of the sources, and the wheel installed into its own folder
    (``site``)."""
    for module in ("build", "twine", "setuptools_scm"):  # the test extra: the build runs offline
        pytest.importorskip(module)
    tmp = tmp_path_factory.mktemp("install")
    # What a build reads, copied: no build/ or egg-info left in the clone, no stale build/ read from it. The copy
    # has no .git, so setuptools-scm takes the version from the environment.
    src = tmp / "src"
    shutil.copytree(os.path.join(ROOT, "vdm"), src / "vdm", ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, file), src)
    dist = tmp / "dist"
    build = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
                           env=dict(os.environ, SETUPTOOLS_SCM_PRETEND_VERSION=VERSION), capture_output=True,
                           text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    sdist, wheel = dist / f"{STEM}.tar.gz", dist / f"{STEM}-py3-none-any.whl"
    assert sorted(os.listdir(dist)) == sorted([sdist.name, wheel.name]), build.stdout[-2000:]
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return types.SimpleNamespace(sdist=sdist, wheel=wheel, site=site)


def outside(installed, cwd, *args) -> subprocess.CompletedProcess:
    """``python *args`` in ``cwd`` (not the clone: neither vdm/ nor configs/ there) with the installed wheel first
    on the path: PYTHONPATH comes before site-packages, where an editable install's finder would send
    `import vdm`."""
    env = dict(os.environ, PYTHONPATH=str(installed.site), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_sdist_and_the_wheel_pass_twine_check_and_carry_the_package_without_junk(installed):
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(installed.sdist),
                            str(installed.wheel)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and check.stdout.count("PASSED") == 2, check.stdout + check.stderr

    with tarfile.open(installed.sdist) as archive:  # the sources and their metadata
        members = [m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()]
    junk = [m for m in members if not (m in ("PKG-INFO", "pyproject.toml", "README.md", "setup.cfg")
                                       or m.startswith(f"{NAME.replace('-', '_')}.egg-info/")
                                       or (m.startswith("vdm/") and m.endswith(".py")))]
    assert not junk and "vdm/__init__.py" in members, junk
    with zipfile.ZipFile(installed.wheel) as archive:  # vdm/ with its configs, and only that
        files = archive.namelist()
    package = sorted(f for f in files if not f.startswith(f"{STEM}.dist-info/"))
    assert package == sorted(m for m in members if m.startswith("vdm/"))
    assert {f"vdm/configs/{config}.py" for config in configs.CONFIGS} <= set(package)


def test_an_installed_wheel_trains_and_scores_with_a_shipped_config_from_outside_the_repository(installed, tmp_path):
    site = installed.site
    where = outside(installed, tmp_path, "-c",
                    "import json, importlib.metadata as m, vdm, vdm.configs; "
                    f"d = m.distribution({NAME!r}); "
                    "print(json.dumps([vdm.__file__, dict(vdm.configs.CONFIGS), vdm.__version__, d.metadata['Name'], "
                    "str(d.locate_file(''))]))")
    assert where.returncode == 0, where.stderr
    package, shipped, version, distribution, location = json.loads(where.stdout)
    assert package == str(site / "vdm" / "__init__.py")
    assert shipped == {config: str(site / "vdm" / "configs" / f"{config}.py") for config in configs.CONFIGS}
    assert (distribution, version, location) == (NAME, VERSION, str(site))  # the wheel's metadata, not the clone's

    # The shipped test config by name, a few steps.
    run = outside(installed, tmp_path, "-m", "vdm.main", "--config", "test", "--workdir", "run",
                  "--config.train.num_steps=2", "--config.eval.num_examples=16", "--config.eval.batch_size=16",
                  "--config.sample.num_images=4", "--config.sample.steps=1")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["step"] == 2 and math.isfinite(result["bpd"]) and result["count"] == 16
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert (tmp_path / result["samples"]).is_file()

    # And scores images it is given, each in a row of the CSV (the digits' format: 8x8, values 0..16).
    images = np.random.default_rng(0).integers(0, 17, size=(3, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "mine.npz", images=images)
    score = outside(installed, tmp_path, "-m", "vdm.main", "--config", "test", "--workdir", "run", "--mode", "score",
                    "--images", "mine.npz", "--config.eval.score_draws=4")
    assert score.returncode == 0, score.stderr
    scored = json.loads(score.stdout.splitlines()[-1])
    assert scored["count"] == 3 and scored["step"] == 2 and math.isfinite(scored["mean_bpd"])
    with open(tmp_path / scored["scores"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["image"] for r in rows] == ["0", "1", "2"] and all(float(r["bpd_se"]) > 0 for r in rows)
