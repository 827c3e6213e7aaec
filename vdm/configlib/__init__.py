"""The configuration: its schema (``vdm.configlib.schema``) and its checks (``vdm.configlib.validation``).

Every field the trainer reads, its default and meaning, is in ``schema.base_config``; each file in
``vdm/configs/`` starts from it. ``validate`` checks a config before anything is written or compiled and
raises ``ConfigError`` with one line naming the bad field; ``validate_against_data`` checks it against the
data set. A renamed field keeps its old name for one release (``RENAMED``; ``apply_deprecated`` moves a
value set under it, ``upgrade_stored`` reads a workdir's stored config). The names below are the package's whole interface (``from vdm import configlib``).
"""
from vdm.configlib.renames import RENAMED, apply_deprecated, upgrade_stored
from vdm.configlib.schema import (COMPUTE_DTYPES, PIECES, ConfigError, Piece, base_config, drop_stale_kwargs,
                                  field_value, flatten, load_file, lock, override)
from vdm.configlib.validation import MAX_GUIDANCE, NAMED, SEEDS, validate, validate_against_data

__all__ = ["COMPUTE_DTYPES", "MAX_GUIDANCE", "NAMED", "PIECES", "RENAMED", "SEEDS", "ConfigError", "Piece",
           "apply_deprecated", "base_config", "drop_stale_kwargs", "field_value", "flatten", "load_file", "lock",
           "override", "upgrade_stored", "validate", "validate_against_data"]
