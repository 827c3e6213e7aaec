"""Install the oldest jax, jaxlib and Flax that pyproject.toml declares (its lower bounds), over the current ones.

    python scripts/install_oldest.py            # pip install jax==<lower> jaxlib==<lower> flax==<lower>
    python scripts/install_oldest.py --print    # only print the requirements

CI runs the suite once with these and once with the newest (`.github/workflows/tests.yml`), so the lower bounds
in pyproject.toml are versions the suite was run on. `make oldest` calls it in the test environment.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib

PINNED = ("jax", "jaxlib", "flax")  # the packages whose range is tested at both ends
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lower_bounds(pyproject: str = os.path.join(ROOT, "pyproject.toml")) -> list[str]:
    """``name==version`` for each of ``PINNED`` from its ``name>=version`` in the project's dependencies.

    Raises:
        ValueError: a package of ``PINNED`` without a ``>=`` lower bound.
    """
    with open(pyproject, "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    pins = []
    for name in PINNED:
        found = [m.group(1) for d in dependencies if (m := re.fullmatch(rf"{name}\s*>=\s*([\w.]+)", d.strip()))]
        if len(found) != 1:
            raise ValueError(f"pyproject.toml: {name} needs one lower bound '{name}>=X', found {found}")
        pins.append(f"{name}=={found[0]}")
    return pins


def main(argv: list[str]) -> int:
    pins = lower_bounds()
    if "--print" in argv:
        print(" ".join(pins))
        return 0
    return subprocess.call([sys.executable, "-m", "pip", "install", "-q", *pins])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
