"""The shipped configs, one file per setup: ``vdm.configs.get("mnist")`` returns its ConfigDict.

Each ``<name>.py`` here has a ``get_config()`` whose docstring gives the command, the
expected bits/dim, the hardware and the wall time. They ship inside the package, so an
installed vdm (``pip install``, a wheel) has them; in a clone, ``configs/`` is a link to
this folder and ``--config configs/mnist.py`` names the same file as ``--config mnist``.

A config is named by a file path or by the name of a shipped config, either optionally
followed by ``:config_string``, which ml_collections passes on as ``get_config(config_string)``.
"""
from __future__ import annotations

import os
import types

from vdm import registry

_HERE = os.path.dirname(os.path.abspath(__file__))

# name -> file of every shipped config
CONFIGS = types.MappingProxyType({name[:-3]: os.path.join(_HERE, name) for name in sorted(os.listdir(_HERE))
                                  if name.endswith(".py") and not name.startswith("_")})


def locate(spec: str) -> str:
    """``spec`` (``PATH[:config_string]`` or ``NAME[:config_string]``) with a shipped config's name
    replaced by its file; a path is returned as it is. ValueError (one line, naming the shipped
    configs) for a name that is neither a file nor a shipped config."""
    where, colon, config_string = spec.partition(":")
    if os.path.isfile(where) or os.sep in where or where.endswith(".py"):
        return spec  # a file: ml_collections loads it, or says that it is not there
    return registry.lookup(CONFIGS, where, "config") + colon + config_string


def get(spec: str):
    """The ConfigDict of a shipped config (``"mnist"``) or of a config file (``"my_config.py"``),
    each optionally ``:config_string``, as ``python -m vdm.main --config SPEC`` reads it."""
    from vdm import configlib  # here, not above: vdm.main imports this module while parsing flags (--help stays fast)

    path, colon, config_string = locate(spec).partition(":")
    return configlib.load_file(path, *([config_string] if colon else []))
