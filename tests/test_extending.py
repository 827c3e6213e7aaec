"""A researcher's own pieces, registered from outside the package, work through the command line in every mode.

``examples/extending`` (a module registering a schedule and a weighting, and a config file that imports it) is
copied to a folder outside the clone and run with the installed package, as a user runs it: training, evaluation,
sampling and scoring find the pieces by name, ``--mode eval`` with the same config finds them again, and
``vdm.testing.check_piece`` passes on them.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np

from conftest import ROOT


def _run(args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def test_a_users_schedule_and_weighting_train_evaluate_sample_and_score_from_outside_the_clone(tmp_path):
    user = tmp_path / "user"
    shutil.copytree(os.path.join(ROOT, "examples", "extending"), user)
    workdir = str(tmp_path / "run")
    config = ["-m", "vdm.main", "--config", "my_config.py", "--workdir", workdir]

    trained = _result(_run(config, user))
    assert trained["step"] == 4 and math.isfinite(trained["bpd"]) and trained["bpd"] > 0
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert (saved["model"]["schedule"], saved["loss"]["weighting"]) == ("power", "tempered_sigmoid")

    evaluated = _result(_run([*config, "--mode", "eval"], user))
    assert evaluated["step"] == 4 and math.isfinite(evaluated["bpd"])

    images = np.load(os.path.join(workdir, f"samples_4.npz"))
    key = "images" if "images" in images else images.files[0]
    np.savez(tmp_path / "mine.npz", images=images[key][:3])
    scored = _run([*config, "--mode", "score", "--images", str(tmp_path / "mine.npz")], user)
    assert scored.returncode == 0, scored.stderr[-3000:]
    with open(os.path.join(workdir, "scores_4.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and all(math.isfinite(float(row["bpd"])) for row in rows)

    checked = _run(["-c", "import my_pieces; from vdm import testing; testing.check_piece('schedule', 'power'); "
                          "testing.check_piece('weighting', 'tempered_sigmoid'); print('ok')"], user)
    assert checked.returncode == 0 and checked.stdout.strip() == "ok", checked.stderr[-3000:]
