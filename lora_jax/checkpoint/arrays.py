"""A tree's array leaves as named, hashed entries: what the checkpoint table records.

Each saved array gets an orbax key (its '/'-joined path made file-system-safe), and a
table row ``{path, shape, dtype, sha256}``. orbax/tensorstore do not checksum array
data, so the sha256 (of dtype, shape and bytes) is what catches a flipped byte.

Example:
    >>> import numpy as np
    >>> tree, table = array_table(flat({"d": {"kernel": np.zeros((2, 3), np.float32)}}))
    >>> list(tree), table["d.kernel"]["path"], table["d.kernel"]["shape"]
    (['d.kernel'], 'd/kernel', [2, 3])
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import jax
import numpy as np

from lora_jax.core import path_str

__all__ = ["array_table", "canonical", "dtype_name", "flat", "host", "sha256_array"]


def flat(tree, is_leaf=None) -> list[tuple[str, Any]]:
    """``[(path, leaf)]`` in flatten order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), x) for p, x in leaves]


def _keys_for(paths: list[str]) -> list[str]:
    """File-system-safe, unique orbax keys: the dotted path (index-prefixed on collision)."""
    keys = [re.sub(r"[^A-Za-z0-9_-]+", ".", p).strip(".") or "leaf" for p in paths]
    if len(set(keys)) != len(keys):
        keys = [f"{i:05d}.{k}" for i, k in enumerate(keys)]
    return keys


def host(x) -> np.ndarray | None:
    """The value on this host, or None for an array spread over other processes."""
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            return None
        return np.asarray(jax.device_get(x))
    return np.asarray(x)


def sha256_array(x: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{x.dtype.str}|{x.shape}|".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def dtype_name(x) -> str:
    return str(np.dtype(x.dtype)) if hasattr(x, "dtype") else type(x).__name__


def canonical(obj) -> bytes:
    """The JSON bytes a metadata sha256 is taken over (key order fixed)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def array_table(leaves: list[tuple[str, Any]]) -> tuple[dict, dict]:
    """``({orbax key: array}, {orbax key: {path, shape, dtype, sha256}})``."""
    keys = _keys_for([p for p, _ in leaves])
    tree, table = {}, {}
    for key, (path, x) in zip(keys, leaves):
        if not hasattr(x, "shape"):
            x = np.asarray(x)
        h = host(x)
        tree[key] = x
        table[key] = {"path": path, "shape": [int(d) for d in x.shape], "dtype": dtype_name(x),
                      "sha256": None if h is None else sha256_array(h)}
    return tree, table
