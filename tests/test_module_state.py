"""No module of ``vdm`` keeps mutable state at module level: what a run changes belongs to an object its caller holds.

The rule, for every name bound at the top level of every module of the package (``pkgutil.walk_packages``):

* a mutable container (dict, list, set, bytearray, deque, or any other mutable mapping, sequence or set), an
  instance of a dataclass that is not frozen, or a writeable numpy array is refused, also inside a
  constant (below);
* a constant is an immutable value: None, a number, a string or bytes, a tuple, a frozenset, a
  ``types.MappingProxyType`` (the form a table of constants takes), a frozen dataclass or a read-only numpy array,
  each holding only such values;
* the one stated exception is a ``vdm.registry.Registry``: the tables of pieces, which only grow, by registration;
* modules, classes, functions, type aliases and dunder names (``__all__``, ``__path__``) are not state.

Anything else (an object of some library's class) is not judged here.
"""
from __future__ import annotations

import collections
import collections.abc
import dataclasses
import importlib
import inspect
import pkgutil
import types
import typing

import numpy as np

import vdm
from vdm import registry

MUTABLE = (dict, list, set, bytearray, collections.deque, collections.abc.MutableMapping,
           collections.abc.MutableSequence, collections.abc.MutableSet)
SCALARS = (type(None), bool, int, float, complex, str, bytes, range, type(Ellipsis))


def problem(value, seen: frozenset = frozenset()) -> str | None:
    """Why ``value`` is mutable module state (a short phrase), or None if it is a constant or not state."""
    if id(value) in seen:
        return None
    seen = seen | {id(value)}
    if isinstance(value, registry.Registry):
        return None
    if isinstance(value, MUTABLE):
        return f"a {type(value).__name__}"
    if isinstance(value, np.ndarray):
        return "a writeable numpy array" if value.flags.writeable else None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if not type(value).__dataclass_params__.frozen:
            return f"an instance of the mutable dataclass {type(value).__name__}"
        inner = (getattr(value, f.name) for f in dataclasses.fields(value))
    elif isinstance(value, (tuple, frozenset)):
        inner = iter(value)
    elif isinstance(value, types.MappingProxyType):
        inner = (x for item in value.items() for x in item)
    else:
        return None
    for item in inner:
        if (why := problem(item, seen)) is not None:
            return f"{type(value).__name__} holding {why}"
    return None


def _not_state(name: str, value) -> bool:
    return (name.startswith("__") and name.endswith("__")) or inspect.ismodule(value) or inspect.isclass(value) \
        or inspect.isroutine(value) or isinstance(value, (SCALARS, typing.TypeVar, types.UnionType,
                                                         types.GenericAlias, type(typing.Optional[int]))) \
        or type(value).__module__ == "__future__"


def module_state(module) -> dict[int, tuple[str, str]]:
    """``id(value) -> (module.NAME, why)`` for each top-level name of ``module`` that holds mutable state."""
    found = {}
    for name, value in vars(module).items():
        if not _not_state(name, value) and (why := problem(value)) is not None:
            found[id(value)] = (f"{module.__name__}.{name}", why)
    return found


def test_the_rule_refuses_mutable_containers_and_accepts_constants():
    @dataclasses.dataclass
    class Mutable:
        x: int = 0

    @dataclasses.dataclass(frozen=True)
    class Frozen:
        x: tuple = ()

    read_only = np.zeros(2)
    read_only.flags.writeable = False
    refused = [{}, [], set(), bytearray(), collections.deque(), collections.OrderedDict(), Mutable(), np.zeros(2),
               ("a", {"b": 1}), ((1, []),), Frozen(([],)), types.MappingProxyType({"a": [1]})]
    accepted = [(), frozenset({1}), types.MappingProxyType({"a": (1, 2)}), Frozen((1, "a")), "s", 1.5, None,
                registry.Registry("thing"), read_only]
    for value in refused:
        assert problem(value) is not None, value
    for value in accepted:
        assert problem(value) is None, value


def test_no_module_of_vdm_holds_mutable_state():
    names: dict[int, list[str]] = {}  # one object bound in several modules (a package re-exports it) is named once
    why: dict[int, str] = {}
    for info in pkgutil.walk_packages(vdm.__path__, "vdm."):
        for key, (name, reason) in module_state(importlib.import_module(info.name)).items():
            names.setdefault(key, []).append(name)
            why[key] = reason
    found = sorted(f"{max(n, key=len)}: {why[key]}" + (f" (also {', '.join(sorted(set(n) - {max(n, key=len)}))})"
                                                       if len(n) > 1 else "") for key, n in names.items())
    assert not found, "module-level mutable state (make it a tuple, frozenset or MappingProxyType, or an " \
                      "object its caller holds):\n" + "\n".join(found)
