"""What the experiment scripts share: the restored model of a workdir, and writing their results."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def restore(config_spec: str, workdir: str):
    """(trainer, step) with the newest checkpoint of ``workdir`` restored; exits with one line if there is none."""
    from vdm import configs, train

    trainer = train.Trainer(configs.get(config_spec), workdir, must_exist=True)
    step = trainer.restore_latest()
    if step == 0:
        trainer.close()
        sys.exit(f"error: no checkpoint in {workdir}: train {config_spec} first (make demo)")
    return trainer, step


def commit() -> str:
    """The git commit of the code that ran (with ``+dirty`` for uncommitted changes), or ``unknown``."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vdm"], cwd=here, capture_output=True,
                               text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(here: str, record: dict, tables: str) -> None:
    """``here/results.json`` and the tables of ``here/README.md`` between ``<!-- results -->`` markers."""
    with open(os.path.join(here, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    readme = os.path.join(here, "README.md")
    text = open(readme).read()
    head, _, rest = text.partition("<!-- results -->")
    _, _, tail = rest.partition("<!-- /results -->")
    with open(readme, "w") as f:
        f.write(f"{head}<!-- results -->\n{tables}\n<!-- /results -->{tail}")
