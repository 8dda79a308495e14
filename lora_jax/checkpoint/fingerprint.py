"""Base fingerprints: which frozen base an adapter was trained on, and how another differs.

Per frozen leaf: its path, shape, dtype and a sha256 of its content: the whole array
for leaves of at most 65,536 elements, otherwise 1,024 elements at evenly spaced flat
indices (first and last included), gathered from each addressable shard so only the
samples reach the host. That is independent of the sharding, costs a few KiB per leaf
for a 7B base, and works on any array leaf (QuantizedWeight codes and scales
included). It catches another checkpoint, another seed or another fine-tune of the
same architecture; it is not meant to catch a handful of edited elements.

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.lora import lorafy
    >>> fp = base_fingerprint(lorafy({"k": jnp.ones((5, 7))}, rank=2, targets="k"))
    >>> list(fp), fp["k/w0"]["shape"], fp["k/w0"]["sampled"]
    (['k/w0'], [5, 7], False)
"""

from __future__ import annotations

import math

import jax
import numpy as np

from lora_jax.checkpoint.arrays import dtype_name, flat, host, sha256_array
from lora_jax.checkpoint.errors import limit, one_sided
from lora_jax.lora import split

__all__ = ["FULL_HASH_MAX", "N_SAMPLES", "base_fingerprint", "compare_base"]

FULL_HASH_MAX = 1 << 16
N_SAMPLES = 1024


def _samples(x, shape: tuple[int, ...]) -> np.ndarray | None:
    """Elements of ``x`` at evenly spaced flat indices, gathered shard by shard (only
    the samples cross to the host; never the whole array)."""
    size = math.prod(shape)
    flat_idx = np.unique(np.linspace(0, size - 1, N_SAMPLES).round().astype(np.int64))
    nd = np.unravel_index(flat_idx, shape)
    if not isinstance(x, jax.Array):
        return np.asarray(x)[nd]
    out = np.empty(len(flat_idx), dtype=np.dtype(x.dtype))
    filled = np.zeros(len(flat_idx), dtype=bool)
    for shard in x.addressable_shards:
        bounds = [sl.indices(dim)[:2] for sl, dim in zip(shard.index, shape)]
        inside = ~filled
        for (lo, hi), ix in zip(bounds, nd):
            inside &= (ix >= lo) & (ix < hi)
        if not inside.any():
            continue
        local = tuple(np.asarray(ix[inside] - lo, np.int32) for (lo, _), ix in zip(bounds, nd))
        out[inside] = np.asarray(jax.device_get(shard.data[local]))
        filled |= inside
    if not filled.all():
        return None  # part of the array lives on other processes
    return out


def _leaf_fingerprint(x) -> dict:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return {"shape": None, "dtype": type(x).__name__, "content": repr(x)[:200]}
    shape = tuple(int(d) for d in x.shape)
    entry = {"shape": list(shape), "dtype": dtype_name(x),
             "sampled": math.prod(shape) > FULL_HASH_MAX}
    values = _samples(x, shape) if entry["sampled"] else host(x)
    entry["content"] = None if values is None else sha256_array(values)
    return entry


def base_fingerprint(params) -> dict:
    """``{path: {shape, dtype, sampled, content}}`` of every frozen leaf of ``params``.

    ``content`` is None for an array not fully addressable from this process
    (multi-host): then only shapes and dtypes are compared."""
    _, frozen = split(params)
    return {path: _leaf_fingerprint(x) for path, x in flat(frozen)}


def _content_differs(a: dict, b: dict) -> bool:
    return (a["shape"] == b["shape"] and a["dtype"] == b["dtype"]
            and a.get("content") is not None and b.get("content") is not None
            and a["content"] != b["content"])


def compare_base(saved: dict, now: dict, allow_different_base: bool) -> list[str]:
    """What differs between two fingerprints, one message per kind of difference."""
    problems = one_sided(saved, now, "base leaves")
    common = [p for p in saved if p in now]
    shapes = [f"{p}: saved {tuple(saved[p]['shape'] or ())}, params {tuple(now[p]['shape'] or ())}"
              for p in common if saved[p]["shape"] != now[p]["shape"]]
    if shapes:
        problems.append(f"base shapes differ: {limit(shapes)}")
    dtypes = [f"{p}: saved {saved[p]['dtype']}, params {now[p]['dtype']}"
              for p in common if saved[p]["dtype"] != now[p]["dtype"]]
    if dtypes:
        problems.append(f"base dtypes differ: {limit(dtypes)}")
    content = [p for p in common if _content_differs(saved[p], now[p])]
    if content and not allow_different_base:
        problems.append(
            f"base weights differ (same shapes and dtypes, other values) at {len(content)} of "
            f"{len(common)} leaves: {limit(content)}. If this is intended (e.g. the same "
            "model re-downloaded in another precision path), pass allow_different_base=True")
    return problems
