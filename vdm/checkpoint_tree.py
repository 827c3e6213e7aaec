"""The tree of a checkpointed state: its fingerprint, its restore target, and how two trees differ.

``vdm.checkpoint`` saves each state with ``fingerprint(state)`` (one number per array leaf) and compares a
restored state's with it; before restoring, it compares the tree on disk with the restore target
(``abstract_like``) and names the leaves that differ (``describe_mismatch``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

_MAX_LISTED_MISMATCHES = 3


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """sum_i bits_i * (2654435761 i + 1) mod 2^32 over the leaf's raw bits: any changed or moved value changes it."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    width = x.dtype.itemsize
    if width in (2, 4) and not jax.numpy.issubdtype(x.dtype, jax.numpy.bool_):
        bits = jax.lax.bitcast_convert_type(x, {2: jax.numpy.uint16, 4: jax.numpy.uint32}[width])
    else:
        bits = x
    bits = bits.ravel().astype(jax.numpy.uint32)
    position = jax.numpy.arange(bits.size, dtype=jax.numpy.uint32)
    return jax.numpy.sum(bits * (position * jax.numpy.uint32(2654435761) + jax.numpy.uint32(1)),
                         dtype=jax.numpy.uint32)


@jax.jit
def _fingerprints(leaves: list) -> list:
    return [_leaf_fingerprint(x) for x in leaves]


def fingerprint(tree: Any) -> dict[str, Any]:
    """``{"params/dense/kernel": uint32, ...}``: one number per array leaf of ``tree`` (see
    ``_leaf_fingerprint``), Python scalars as they are. Keyed by path, so a state restored
    as plain dicts compares with the dataclass it was saved from."""
    leaves = _paths(tree)
    arrays = {k: x for k, x in leaves.items() if isinstance(x, (jax.Array, np.ndarray))}
    sums = jax.device_get(_fingerprints([jax.numpy.asarray(x) for x in arrays.values()]))
    return {k: int(sums.pop(0)) if k in arrays else x for k, x in leaves.items()}


def listed(keys: list[str], limit: int = 4) -> str:
    """``a, b, c`` or ``a, b, c, d (+3 more)``: the first ``limit`` of ``keys`` and how many more there are."""
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown} (+{len(keys) - limit} more)"


def abstract_like(tree: Any) -> Any:
    """Turn a concrete state into a restore target of ``jax.ShapeDtypeStruct``.

    ``jax.Array`` leaves keep their sharding (typed PRNG keys keep their key
    dtype); other leaves (``ShapeDtypeStruct``, Python scalars, numpy arrays)
    are kept, which makes Orbax restore the latter two as the same host type.
    """

    def convert(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(convert, tree)


def _leaf_signature(x: Any) -> tuple[tuple[int, ...], np.dtype | None]:
    """(shape, dtype) as stored on disk for a restore-target leaf; dtype None = any."""
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key
    ):
        data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
        return tuple(data.shape), np.dtype(data.dtype)
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
        return tuple(x.shape), np.dtype(x.dtype)
    # Python scalars: Orbax stores them with its own dtype choice.
    return tuple(np.shape(x)), None


def _paths(tree: Any) -> dict[str, Any]:
    """``{"params/dense/kernel": leaf}`` for every leaf of ``tree``."""
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "(" + ",".join(map(str, shape)) + ")"


def describe_mismatch(stored: Any, target: Any) -> str | None:
    """The differences of a checkpoint's tree from a restore target, or None where there is none.

    Args:
        stored: the tree's metadata on disk (leaves with ``shape`` and ``dtype``).
        target: the restore target (``abstract_like``'s leaves, or Python scalars).

    Returns:
        ``"target has a not in the checkpoint; params/w: checkpoint shape (2,) != target shape (3,)"``: the
        leaves missing on either side, then shapes and dtypes that differ (at most ``_MAX_LISTED_MISMATCHES``).
    """
    on_disk = _paths(stored)
    wanted = _paths(target)
    problems: list[str] = []
    missing = sorted(set(wanted) - set(on_disk))
    extra = sorted(set(on_disk) - set(wanted))
    if missing:
        problems.append("target has " + listed(missing) + " not in the checkpoint")
    if extra:
        problems.append("checkpoint has " + listed(extra) + " not in the target")
    for key in sorted(set(wanted) & set(on_disk)):
        shape, dtype = _leaf_signature(wanted[key])
        meta = on_disk[key]
        disk_shape = tuple(getattr(meta, "shape", None) or ())
        disk_dtype = getattr(meta, "dtype", None)
        if disk_shape != shape:
            problems.append(
                f"{key}: checkpoint shape {_fmt_shape(disk_shape)} != target shape {_fmt_shape(shape)}"
            )
        elif dtype is not None and disk_dtype is not None and np.dtype(disk_dtype) != dtype:
            problems.append(f"{key}: checkpoint dtype {np.dtype(disk_dtype)} != target dtype {dtype}")
    if not problems:
        return None
    shown = problems[:_MAX_LISTED_MISMATCHES]
    if len(problems) > len(shown):
        shown.append(f"and {len(problems) - len(shown)} more difference(s)")
    return "; ".join(shown)
