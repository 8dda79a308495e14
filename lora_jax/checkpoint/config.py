"""The adapter and quantization configuration a checkpoint records, and how two differ.

Per adapter node (LoraWeight, DoraWeight, MultiLoraWeight...): its type, rank, static
fields (alpha, rslora, in_axes, names...), dtype and the shapes of its trainable
fields. Per quantized base leaf: its node type, shape, dtype and static fields
(kind, block_size...). A layout is recorded as ``in_axes``; a node that stores
``in_ndim`` (and metadata written before ``in_axes`` existed) means
``in_axes = range(in_ndim)``, so both compare equal.

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.lora import lorafy
    >>> cfg = lora_config(lorafy({"k": jnp.ones((5, 7))}, rank=2, alpha=4.0, targets="k"))
    >>> cfg["k"]["rank"], cfg["k"]["alpha"], cfg["k"]["in_axes"], cfg["k"]["a_shape"]
    (2, 4.0, [0], [5, 2])
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lora_jax.checkpoint.arrays import dtype_name, flat
from lora_jax.checkpoint.errors import limit, one_sided
from lora_jax.core import ImplicitArray, is_implicit
from lora_jax.lora import is_adapter

__all__ = ["compare_config", "lora_config", "node_config", "quant_config"]


def _jsonable(v):
    if isinstance(v, (bool, int, float, str, type(None))):
        return v
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    try:
        return str(np.dtype(v))
    except TypeError:
        return repr(v)


def _static_fields(node) -> dict:
    return {f.name: _jsonable(getattr(node, f.name))
            for f in dataclasses.fields(node) if f.metadata.get("static")}


def _layout_as_in_axes(cfg: dict) -> dict:
    if "in_ndim" in cfg and "in_axes" not in cfg:
        cfg = dict(cfg)
        cfg["in_axes"] = list(range(int(cfg.pop("in_ndim"))))
    return cfg


def node_config(node) -> dict:
    """JSON description of an implicit node: type, shape, dtype and its static fields."""
    return {**_static_fields(node), "type": type(node).__name__,
            "shape": [int(d) for d in node.shape], "dtype": str(np.dtype(node.dtype))}


def quant_config(params) -> dict:
    """Per quantized base leaf (a LoraWeight's w0 or a bare node): :func:`node_config`."""
    out = {}
    for path, x in flat(params, is_leaf=is_implicit):
        node, where = (getattr(x, "w0", None), f"{path}/w0") if is_adapter(x) else (x, path)
        if isinstance(node, ImplicitArray) and dataclasses.is_dataclass(node):
            out[where] = node_config(node)
    return out


def lora_config(params) -> dict:
    """Per adapter node: type, rank, static fields, dtype, ``<field>_shape`` per trainable
    field (a fully trained :class:`~lora_jax.Trainable` leaf: type, dtype, ``value_shape``)."""
    out = {}
    for path, x in flat(params, is_leaf=is_adapter):
        if is_adapter(x):
            first = getattr(x, type(x).trainable_fields[0])
            cfg = {"type": type(x).__name__, **_static_fields(x), "dtype": dtype_name(first)}
            if hasattr(x, "a"):
                cfg["rank"] = int(x.a.shape[-1])
            for f in type(x).trainable_fields:
                cfg[f"{f}_shape"] = [int(d) for d in getattr(x, f).shape]
            out[path] = _layout_as_in_axes(cfg)
    return out


def _field_diffs(saved: dict, now: dict) -> list[str]:
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    return [f"{k} saved {saved.get(k)!r} vs params {now.get(k)!r}" for k in keys]


def compare_config(saved: dict, now: dict, what: str) -> list[str]:
    """Messages naming the ``what`` entries missing on either side or with other fields."""
    saved = {p: _layout_as_in_axes(c) for p, c in saved.items()}
    problems = one_sided(saved, now, what)
    diffs = [f"{p}: " + ", ".join(_field_diffs(saved[p], now[p]))
             for p in saved if p in now and saved[p] != now[p]]
    if diffs:
        problems.append(f"{what} differ: {limit(diffs)}")
    return problems
