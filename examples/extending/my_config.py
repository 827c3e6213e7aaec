"""A config that trains with the pieces of ``my_pieces.py`` (a file beside this one).

    python -m vdm.main --config my_config.py --workdir /tmp/my_run
    python -m vdm.main --config my_config.py --workdir /tmp/my_run --mode eval

Importing ``my_pieces`` registers its schedule and weighting; every mode reads this file first, so each
finds them again.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # my_pieces.py beside this file

import my_pieces  # noqa: E402,F401  (registers "power" and "tempered_sigmoid")

from vdm import configs  # noqa: E402


def get_config():
    c = configs.get("test")  # the library's tiny test config: seconds on a CPU
    c.model.schedule = "power"
    c.model.schedule_kwargs = {"power": 2.0}
    c.loss.weighting = "tempered_sigmoid"
    c.loss.weighting_kwargs = {"bias": 1.0}
    return c
