"""The one lookup every registry uses: a plain dict of name -> piece, and a clear error.

Each module keeps its pieces in a dict at the bottom (``SCHEDULES``, ``WEIGHTINGS``,
``NETWORKS``, ``SAMPLERS``, ``TIME_SAMPLERS``, ``DENSITIES``, ``vdm.data.SOURCES``) and
looks names up here, so an unknown name always reads
``unknown schedule 'quadratic'; valid names: fixed_linear, learned_linear, ...``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


def lookup(table: Mapping[str, T], name: str, kind: str, error: type[Exception] = ValueError) -> T:
    """``table[name]``, or ``error`` naming the ``kind`` of piece and every valid name."""
    try:
        return table[name]
    except (KeyError, TypeError):
        raise error(f"unknown {kind} {name!r}; valid names: {', '.join(table)}") from None
