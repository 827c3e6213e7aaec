"""Every registered piece of every kind meets its kind's contract (``vdm.testing``): a new piece, shipped or
registered by a module the suite imports, is checked here with the example its registration carries, and
needs no edit of any test file."""
from __future__ import annotations

import pytest

from vdm import testing

CASES = [(kind, name) for kind in testing.KINDS for name in testing.registry_of(kind)]


@pytest.mark.parametrize("kind, name", CASES, ids=[f"{kind}-{name}" for kind, name in CASES])
def test_every_registered_piece_meets_its_contract(kind, name):
    testing.check_piece(kind, name)


def test_every_kind_has_pieces_and_checks():
    for kind in testing.KINDS:
        assert len(testing.registry_of(kind)) > 0, kind


def test_an_unknown_kind_or_name_is_one_clear_error():
    with pytest.raises(ValueError, match="^unknown kind of piece 'scheduler'; valid kinds: schedule, weighting, "):
        testing.check_piece("scheduler", "cosine")
    with pytest.raises(ValueError, match="^unknown schedule 'quadratic'; valid names: "):
        testing.check_piece("schedule", "quadratic")
