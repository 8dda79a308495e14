"""Placing trees (nodes, ``None`` holes, abstract leaves) on a mesh, and per-device bytes.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> placed = shard_params({"w": jnp.ones((4, 6))}, mesh, {"w": P("fsdp", None)})
    >>> placed["w"].sharding.spec, per_device_bytes(placed)
    (P('fsdp', None), 96)
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def named_shardings(specs, mesh: Mesh):
    """The spec tree with every PartitionSpec turned into a NamedSharding on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def place(x, sharding: NamedSharding):
    """One leaf on ``sharding``: a fresh array, or a ``ShapeDtypeStruct`` carrying it."""
    if x is None:
        return None
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if jax.process_count() == 1:
        # may_alias=False: always fresh buffers, so a step that donates them never
        # deletes the caller's arrays.
        return jax.device_put(x, sharding, may_alias=False)
    # Multi-controller: every process holds the full (identical) host value; each
    # device takes its slice.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding, may_alias=False)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def place_tree(tree, shardings):
    """``tree`` with every leaf placed on the matching NamedSharding of ``shardings``."""
    return jax.tree.map(lambda s, x: place(x, s), shardings, tree,
                        is_leaf=lambda x: isinstance(x, NamedSharding) or x is None)


def shard_params(params, mesh: Mesh, specs):
    """Place ``params`` on ``mesh`` following ``specs`` (from ``lora_specs`` / ``fsdp_specs``).

    Works for trees with LoraWeight / QuantizedWeight nodes (their array leaves are
    placed one by one), ``None`` holes, and ``jax.ShapeDtypeStruct`` leaves (returned
    with the sharding attached, for ``jit(...).lower``). In a multi-process run every
    process passes the same full host values; each process keeps its addressable shards.
    """
    return place_tree(params, named_shardings(specs, mesh))


def per_device_bytes(tree) -> int:
    """Bytes one device holds for ``tree`` (max over devices; abstract leaves need a sharding)."""
    per: dict = {}
    total = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(x.shape)
        item = np.dtype(x.dtype).itemsize
        sh = getattr(x, "sharding", None)
        if sh is None:
            total += math.prod(shape) * item
            continue
        local = math.prod(sh.shard_shape(shape)) * item
        for d in sh.device_set:
            per[d] = per.get(d, 0) + local
    return total + (max(per.values()) if per else 0)
