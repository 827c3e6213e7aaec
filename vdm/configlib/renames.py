"""Config fields that were renamed, and the one road an old name takes to its new field for one release.

``RENAMED`` is the table (old dotted name -> new dotted name). The schema keeps each old name as a field
with no value (``None``), so that ``--config.loss.num_steps=10`` on the command line and
``c.loss.num_steps = 10`` in a config file still parse; ``apply_deprecated`` then moves a value set there
into the new field, unsets the old field and says so in one line (``deprecation``). It runs wherever a
config is resolved: ``vdm.main.resolve`` (the command line), ``configlib.override`` (and so
``vdm.train.resolve_config``, which every program of ``vdm.train`` calls), where ``translate`` also takes an old
name among the overrides. A workdir's stored config (``config.json``, a checkpoint's metadata) written before a
rename is read through ``upgrade_stored``.
"""
from __future__ import annotations

import types
from collections.abc import Collection, Mapping
from typing import Any

import ml_collections

from vdm.configlib.errors import ConfigError

# old dotted name -> new dotted name; each old name goes in the release after the one that renamed it
RENAMED = types.MappingProxyType({
    "loss.num_steps": "loss.timesteps",  # the training loss's T (0 = continuous time)
    "eval.num_steps": "eval.timesteps",  # the evaluated bound's T
    "sample.num_steps": "sample.steps",  # the sampler's steps
})


def deprecation(old: str) -> str:
    """The one line said when an old name is used.

    Args:
        old: a key of ``RENAMED`` ("loss.num_steps").

    Returns:
        ``warning: config.<old> is deprecated: use config.<new> (the old name goes in the next release)``.
    """
    return (f"warning: config.{old} is deprecated: use config.{RENAMED[old]} "
            "(the old name goes in the next release)")


def _section(config, dotted: str):
    """(the ConfigDict holding the field ``dotted``, the field's own name)."""
    *parents, name = dotted.split(".")
    for key in parents:
        config = config[key]
    return config, name


def add_deprecated_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Give ``config`` (unlocked, with every new field of ``RENAMED`` set) each old name as a field of no value
    (``None``) of its new field's type, so that the command line and config files may still set it.

    Returns:
        ``config``.
    """
    for old, new in RENAMED.items():
        section, name = _section(config, old)
        new_section, new_name = _section(config, new)
        section[name] = ml_collections.config_dict.placeholder(type(new_section[new_name]))
    return config


def _both(old: str, old_value, new_value) -> ConfigError:
    return ConfigError(f"config.{old}={old_value!r} and config.{RENAMED[old]}={new_value!r} are both set: "
                       f"config.{old} is the deprecated name of config.{RENAMED[old]}; set only the new one")


def apply_deprecated(config: ml_collections.ConfigDict, overridden: Collection[str] = ()) -> list[str]:
    """Move each value set under an old name of ``RENAMED`` into its new field, and unset the old field (``None``).

    An old name set (not ``None``) is said once (``deprecation``); its value goes into the new field, except
    where the new field was set by a later layer (``overridden``, the command line's or an override's fields)
    and the old one was not: then the later layer wins. The old field stays, unset, so that a resolved config
    has the fields of one never resolved (the compiled functions are kept under whole sections:
    ``vdm.compilation``), and resolving twice says nothing twice.

    Args:
        config: a config of ``base_config``'s fields; changed in place.
        overridden: the dotted fields set on the command line (or by ``override``).

    Returns:
        One ``deprecation`` line per old name that was set.

    Raises:
        ConfigError: an old name and its new one both set in ``overridden``, to different values (naming both).
    """
    notes = []
    for old, new in RENAMED.items():
        section, name = _section(config, old)
        value = section.get(name)
        if value is None:
            continue
        new_section, new_name = _section(config, new)
        if old in overridden and new in overridden and new_section[new_name] != value:
            raise _both(old, value, new_section[new_name])
        if old in overridden or new not in overridden:
            new_section[new_name] = value
        section[name] = None
        notes.append(deprecation(old))
    return notes


def translate(overrides: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """Old names among dotted overrides, replaced by their new ones.

    Args:
        overrides: dotted field -> value (``{"loss.num_steps": 10}``), as ``configlib.override`` takes them.

    Returns:
        (a new dict, each old name of ``RENAMED`` replaced by its new one; one ``deprecation`` line per old name).

    Raises:
        ConfigError: an old name and its new one both given, with different values (naming both).
    """
    out, notes = {}, []
    for key, value in overrides.items():
        if key in RENAMED:
            if RENAMED[key] in overrides and overrides[RENAMED[key]] != value:
                raise _both(key, value, overrides[RENAMED[key]])
            notes.append(deprecation(key))
            key = RENAMED[key]
        out[key] = value
    return out, notes


def upgrade_stored(tree: Mapping) -> dict:
    """A workdir's stored config read as this release names its fields.

    Args:
        tree: a stored config (``config.json``'s or a checkpoint's ``meta["config"]``: nested dicts); not changed.

    Returns:
        A copy with each old name of ``RENAMED`` under its new one, so that a workdir written before a rename reads
        as one written after it. A new name already there is kept; the old name is dropped either way.
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}  # the sections RENAMED touches
    for old, new in RENAMED.items():
        (section, name), (new_section, new_name) = old.split("."), new.split(".")
        if isinstance(out.get(section), dict) and name in out[section]:
            value = out[section].pop(name)
            if value is not None:
                out.setdefault(new_section, {}).setdefault(new_name, value)
    return out
