"""lorafy: replace targeted leaves of a parameter tree with LoraWeight nodes.

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((5, 7)), "bias": jnp.zeros(7)}}
    >>> lp = lorafy(params, rank=2, key=jax.random.key(0))
    >>> lp["dense"]["kernel"].a.shape, lp["dense"]["kernel"].b.shape
    ((5, 2), (2, 7))
    >>> bool((merge(lp)["dense"]["kernel"] == 1.0).all())   # B = 0: starts as the base
    True
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.lora.layout import LayoutSpec, resolve_layout
from lora_jax.core.tree import path_str
from lora_jax.core.implicit import ImplicitArray, is_implicit
from lora_jax.lora.weight import LoraWeight, is_adapter

Targets = Union[None, str, Sequence[str], Callable[[str, Any], bool]]

_INITS = ("kaiming", "gaussian")
_DEFAULT_LEAF_NAMES = ("kernel", "weight")


def _is_float(leaf) -> bool:
    return jnp.issubdtype(leaf.dtype, jnp.floating)


def _default_target(path: str, leaf) -> bool:
    return (path.rsplit("/", 1)[-1] in _DEFAULT_LEAF_NAMES
            and len(leaf.shape) >= 2 and _is_float(leaf))


def select_leaves(params, targets: Targets, *, what: str):
    """[(path_str, keypath, leaf)] of the leaves ``targets`` picks; checks rules match."""
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_implicit)
    entries = [(path_str(p), p, leaf) for p, leaf in flat]
    if targets is None:
        chosen = [e for e in entries if hasattr(e[2], "shape") and _default_target(e[0], e[2])]
        if not chosen:
            raise ValueError(
                f"{what}: no leaf named 'kernel' or 'weight' with ndim >= 2 in the tree; "
                "pass targets= (a regex on the '/'-joined path, a list of them, or a predicate).")
        return chosen
    if callable(targets):
        chosen = [e for e in entries if targets(e[0], e[2])]
        if not chosen:
            raise ValueError(f"{what}: the targets predicate matched no leaf; "
                             f"paths are like {entries[0][0]!r}.")
        return chosen
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError(f"{what}: targets is an empty list; pass None for the default.")
    chosen, seen = [], set()
    for pat in patterns:
        try:
            rx = re.compile(pat)
        except (re.error, TypeError) as e:
            raise ValueError(f"{what}: target {pat!r} is not a valid regex ({e}).") from None
        hits = [e for e in entries if rx.search(e[0])]
        if not hits:
            example = ", ".join(repr(e[0]) for e in entries[:4])
            raise ValueError(f"{what}: target rule {pat!r} matches no leaf; paths look like {example}.")
        for e in hits:
            if e[0] not in seen:
                seen.add(e[0])
                chosen.append(e)
    order = {e[0]: i for i, e in enumerate(entries)}
    return sorted(chosen, key=lambda e: order[e[0]])


def _pattern_value(pattern: Mapping[str, Any] | None, path: str, default):
    for rx, value in (pattern or {}).items():
        if re.search(rx, path):
            return value
    return default


def _check_target(path: str, leaf):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise TypeError(f"leaf {path!r} is a {type(leaf).__name__}, not an array; "
                        "exclude it from targets.")
    if not _is_float(leaf):
        raise ValueError(f"leaf {path!r} has dtype {leaf.dtype}; LoRA needs a floating weight. "
                         "Exclude it from targets.")
    if len(leaf.shape) < 2:
        raise ValueError(f"leaf {path!r} has shape {tuple(leaf.shape)}; LoRA needs ndim >= 2. "
                         "Exclude it from targets.")


def _leaf_layout(layout: LayoutSpec, path: str, leaf):
    if isinstance(leaf, ImplicitArray) and hasattr(leaf, "in_ndim") and layout is None:
        stack = getattr(leaf, "stack_ndim", None)
        if stack is None:
            stack, _ = resolve_layout(None, path, leaf)
        return stack, leaf.in_ndim
    return resolve_layout(layout, path, leaf)


def lorafy(params, rank: int = 8, *, alpha: float | None = None, targets: Targets = None,
           key: jax.Array | None = None, rank_pattern: Mapping[str, int] | None = None,
           alpha_pattern: Mapping[str, float] | None = None, rslora: bool = False,
           init: str = "kaiming", layout: LayoutSpec = None, dtype=None):
    """Return ``params`` with targeted leaves replaced by :class:`LoraWeight` nodes.

    Args:
      params: any pytree of arrays (QuantizedWeight leaves may be targeted too).
      rank: LoRA rank r (> 0, <= min(in, out) of every target).
      alpha: scale numerator; ``scale = alpha / r`` (``alpha / sqrt(r)`` if ``rslora``).
        Defaults to ``rank`` (scale 1), as the LoRA paper fixes alpha to the first r tried.
      targets: ``None`` = every floating ``kernel``/``weight`` leaf with ndim >= 2;
        a regex searched in the '/'-joined key path, a list of them (each must match),
        or ``predicate(path, leaf) -> bool``.
      key: PRNG key for A's init (default ``jax.random.key(0)``).
      rank_pattern / alpha_pattern: ``{regex: value}`` per-target overrides, first match wins.
      init: ``"kaiming"`` (PEFT's default: A ~ U(+-1/sqrt(fan_in))) or ``"gaussian"``
        (A ~ N(0, 1/r^2), PEFT's ``init_lora_weights="gaussian"``). B is always zero.
      layout: ``{regex: (stack_ndim, in_ndim)}`` or ``callable(path, leaf)`` overriding
        how kernels split into stacked / input / output axes (see ``_layout.default_layout``).
      dtype: dtype of A and B (default: the weight's dtype).
    """
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}.")
    if alpha is not None and not (isinstance(alpha, (int, float, np.number)) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}.")
    if init not in _INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {_INITS}.")
    key = jax.random.key(0) if key is None else key

    chosen = select_leaves(params, targets, what="lorafy")
    replace = {}
    keys = jax.random.split(key, len(chosen))
    for k, (path, kp, leaf) in zip(keys, chosen):
        if isinstance(leaf, LoraWeight):
            raise ValueError(f"leaf {path!r} is already a LoraWeight; merge() it first.")
        _check_target(path, leaf)
        r = int(_pattern_value(rank_pattern, path, rank))
        a_ = float(_pattern_value(alpha_pattern, path, alpha if alpha is not None else r))
        if r <= 0:
            raise ValueError(f"rank_pattern gives leaf {path!r} rank {r}; it must be > 0.")
        if a_ <= 0:
            raise ValueError(f"alpha_pattern gives leaf {path!r} alpha {a_}; it must be > 0.")
        stack, n_in = _leaf_layout(layout, path, leaf)
        shape = tuple(leaf.shape)
        s_shape, i_shape, o_shape = shape[:stack], shape[stack:stack + n_in], shape[stack + n_in:]
        fan_in, fan_out = math.prod(i_shape), math.prod(o_shape)
        if r > min(fan_in, fan_out):
            raise ValueError(
                f"rank {r} exceeds min(in={fan_in}, out={fan_out}) of leaf {path!r} "
                f"(shape {shape}); lower rank or give this leaf one via rank_pattern.")
        ab_dtype = dtype or leaf.dtype
        if init == "kaiming":
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(k, (*s_shape, *i_shape, r), jnp.float32, -bound, bound)
        else:
            a = jax.random.normal(k, (*s_shape, *i_shape, r), jnp.float32) / r
        b = jnp.zeros((*s_shape, r, *o_shape), ab_dtype)
        replace[path] = LoraWeight(w0=leaf, a=a.astype(ab_dtype), b=b, alpha=a_,
                                   rslora=bool(rslora), in_ndim=n_in)

    def swap(kp, leaf):
        return replace.get(path_str(kp), leaf)

    return jax.tree_util.tree_map_with_path(swap, params, is_leaf=is_implicit)


def merge(params):
    """A plain tree: every adapter node formed (``w0 + scale * a @ b``; DoRA's
    ``m * V / ||V||``) for serving/export. Quantized bases are dequantized."""
    return jax.tree.map(lambda x: x.materialize() if is_adapter(x) else x,
                        params, is_leaf=is_adapter)
