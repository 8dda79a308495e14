"""Which leaves of a parameter tree a transformation targets: one rule for all.

``lorafy``, ``quantize`` and everything else that picks leaves use
:func:`select_leaves`. ``targets`` is ``None`` (the default), a regex searched
in the '/'-joined key path, a list of regexes (each must match something), or
a predicate ``(path, leaf) -> bool``.

The default finds the weight matrices of every common JAX framework by leaf
name: Flax ``kernel`` (also NNX State paths ``.../kernel/value``), PyTorch-style
and Equinox ``weight``, dm-haiku and Gemma-einsum ``w``; floating, ndim >= 2.

Example:
    >>> import jax.numpy as jnp
    >>> tree = {"linear": {"w": jnp.ones((5, 7)), "b": jnp.ones(7)},
    ...         "attn": {"kernel": {"value": jnp.ones((7, 3))}}}
    >>> [p for p, _, _ in select_leaves(tree, None, what="demo")]
    ['attn/kernel/value', 'linear/w']
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

import jax
import jax.numpy as jnp

from lora_jax.core.implicit import is_implicit
from lora_jax.core.tree import path_str

Targets = Union[None, str, Sequence[str], Callable[[str, Any], bool]]

DEFAULT_LEAF_NAMES = ("kernel", "weight", "w")
_WRAPPER_NAMES = ("value", "raw_value")      # NNX Variable/State wrappers


def leaf_name(path: str) -> str:
    """The parameter's own name: the last path part, skipping NNX's ``value``."""
    parts = path.split("/")
    if len(parts) > 1 and parts[-1] in _WRAPPER_NAMES:
        return parts[-2]
    return parts[-1]


def is_float_array(leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    return dtype is not None and hasattr(leaf, "shape") and jnp.issubdtype(dtype, jnp.floating)


def is_default_target(path: str, leaf) -> bool:
    return (leaf_name(path) in DEFAULT_LEAF_NAMES and is_float_array(leaf)
            and len(leaf.shape) >= 2)


def _examples(entries, n: int = 6) -> str:
    shown = [f"{p!r} {tuple(getattr(x, 'shape', ()))}" for p, _, x in entries
             if hasattr(x, "shape")][:n]
    return ", ".join(shown) or "(no array leaves)"


def select_leaves(params, targets: Targets, *, what: str,
                  default: Callable[[str, Any], bool] | None = None):
    """``[(path, keypath, leaf)]`` of the leaves ``targets`` picks, in tree order.

    Nodes (``ImplicitArray``) are leaves. ``default`` replaces the name-based
    default predicate when ``targets`` is None. Raises ``ValueError`` naming
    real paths of the tree when nothing (or some rule) matches nothing.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_implicit)
    entries = [(path_str(p), p, leaf) for p, leaf in flat]
    fix = ("Pass targets= (a regex searched in the '/'-joined path, a list of them, or a "
           "predicate(path, leaf)).")
    if targets is None:
        pred = default or is_default_target
        chosen = [e for e in entries if pred(e[0], e[2])]
        if not chosen:
            raise ValueError(
                f"{what}: no leaf matches the default targets (floating, ndim >= 2, named "
                f"{' / '.join(DEFAULT_LEAF_NAMES)}). The tree holds {_examples(entries)}. {fix}")
        return chosen
    if callable(targets):
        chosen = [e for e in entries if targets(e[0], e[2])]
        if not chosen:
            raise ValueError(f"{what}: the targets predicate matched no leaf; the tree holds "
                             f"{_examples(entries)}.")
        return chosen
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError(f"{what}: targets is an empty list; pass None for the default. {fix}")
    seen: set[str] = set()
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"{what}: each target must be a regex string, got {pat!r}. {fix}")
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise ValueError(f"{what}: target {pat!r} is not a valid regex ({e}).") from None
        hits = [e[0] for e in entries if rx.search(e[0])]
        if not hits:
            raise ValueError(f"{what}: target {pat!r} matches no leaf; the tree holds "
                             f"{_examples(entries)}.")
        seen.update(hits)
    return [e for e in entries if e[0] in seen]
