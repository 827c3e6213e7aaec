"""The registry every kind of piece uses: append-only, checked by a contract at registration, one clear error."""
from __future__ import annotations

import pytest

from vdm import registry


def _contract(name, piece):
    if not callable(piece):
        raise TypeError(f"{piece!r} is not callable")


def test_register_as_a_decorator_and_directly_and_read_as_a_mapping():
    table = registry.Registry("widget", _contract)

    @table.register("double", example={"x": 2})
    def double(x):
        return 2 * x

    assert double(3) == 6  # the decorator returns what it decorates
    table.register("square", lambda x: x * x)
    assert list(table) == ["double", "square"] and len(table) == 2 and "double" in table
    assert table["square"](3) == 9 and table == {"double": double, "square": table["square"]}
    entry = table.entry("double")
    assert (entry.name, entry.piece, entry.example, entry.module) == ("double", double, {"x": 2}, __name__)


def test_a_taken_name_or_a_broken_piece_is_refused_and_nothing_changes():
    table = registry.Registry("widget", _contract)
    table.register("double", lambda x: 2 * x)
    before = dict(table)
    with pytest.raises(registry.RegistrationError, match=r"^widget 'double' is already registered \(by "):
        table.register("double", lambda x: 3 * x)
    with pytest.raises(registry.RegistrationError, match="^widget 'seven' does not meet the widget contract: 7 is "
                                                         "not callable$"):
        table.register("seven", 7)
    with pytest.raises(registry.RegistrationError, match="^widget name '': must be a non-empty string"):
        table.register("", lambda x: x)
    assert dict(table) == before


def test_an_unknown_name_names_every_valid_one():
    table = registry.Registry("widget")
    table.register("a", 1)
    table.register("b", 2)
    with pytest.raises(ValueError, match="^unknown widget 'c'; valid names: a, b$"):
        table.lookup("c")
    with pytest.raises(KeyError, match="unknown widget 'c'"):
        table.lookup("c", KeyError)
    with pytest.raises(ValueError, match="^unknown widget 'c'"):
        table.entry("c")
