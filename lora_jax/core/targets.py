"""Which leaves of a parameter tree a transformation targets: one rule for all.

``lorafy``, ``quantize`` and everything else that picks leaves use
:func:`select_leaves`. ``targets`` is ``None`` (the default), a regex searched
in the '/'-joined key path, a list of regexes (each must match something), or
a predicate ``(path, leaf) -> bool``.

The default finds the weight matrices of every common JAX framework by leaf
name: Flax ``kernel`` (also NNX State paths ``.../kernel/value``), PyTorch-style
and Equinox ``weight`` (and RNN cells' ``weight_ih``/``weight_hh``), dm-haiku and
Gemma-einsum ``w`` (haiku GRU's ``w_i``/``w_h``), Keras RNNs' ``recurrent_kernel``;
floating, ndim >= 2.

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

from lora_jax.core import checks
from lora_jax.core.implicit import is_implicit
from lora_jax.core.tree import path_str

Targets = Union[None, str, Sequence[str], Callable[[str, Any], bool]]

# Also recurrent cells' gate matrices: Equinox GRUCell/LSTMCell ``weight_ih``/``weight_hh``
# (out, in); haiku GRU ``w_i``/``w_h`` and Keras LSTM/GRU ``recurrent_kernel`` (in, out).
DEFAULT_LEAF_NAMES = ("kernel", "weight", "w", "weight_ih", "weight_hh", "w_i", "w_h",
                      "recurrent_kernel")
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


def _why_not(path: str, leaf) -> str | None:
    """Why a leaf named like a weight is not a default target (None: it is one)."""
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        return f"{path!r} is a {type(leaf).__name__}, not an array"
    if not is_float_array(leaf):
        return (f"{path!r} has dtype {leaf.dtype}: only floating weights can be adapted or "
                "quantized (cast it, or it is not a weight)")
    if len(leaf.shape) < 2:
        return f"{path!r} has shape {tuple(leaf.shape)}: a weight needs ndim >= 2"
    return None


def _no_default(what: str, entries, fix: str) -> ValueError:
    near = [r for p, _, x in entries if leaf_name(p) in DEFAULT_LEAF_NAMES
            for r in [_why_not(p, x)] if r]
    why = f": {'; '.join(near[:4])}." if near else "."
    return ValueError(
        f"{what}: no leaf matches the default targets{why} Default targets are floating, "
        f"ndim >= 2, named {' / '.join(DEFAULT_LEAF_NAMES)}; the tree holds "
        f"{_examples(entries)}. {fix}")


def _patterns(what: str, targets, fix: str) -> list:
    if isinstance(targets, (str, re.Pattern)):
        return [targets]
    if not isinstance(targets, (list, tuple, set, frozenset)):
        raise TypeError(f"{what}: targets must be None, a regex string, a list of them or a "
                        f"predicate(path, leaf), got {type(targets).__name__} {targets!r}. {fix}")
    if not targets:
        raise ValueError(f"{what}: targets is an empty list; pass None for the default. {fix}")
    return list(targets)


def select_leaves(params, targets: Targets, *, what: str,
                  default: Callable[[str, Any], bool] | None = None):
    """``[(path, keypath, leaf)]`` of the leaves ``targets`` picks, in tree order.

    Nodes (``ImplicitArray``) are leaves. ``default`` replaces the name-based
    default predicate when ``targets`` is None. Raises ``ValueError`` naming
    real paths of the tree when nothing (or some rule) matches nothing, and
    ``TypeError`` when ``targets`` is of no accepted kind.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_implicit)
    entries = [(path_str(p), p, leaf) for p, leaf in flat]
    fix = ("Pass targets= (a regex searched in the '/'-joined path, a list of them, or a "
           "predicate(path, leaf)).")
    if targets is None:
        pred = default or is_default_target
        chosen = [e for e in entries if pred(e[0], e[2])]
        if not chosen and default is not None:
            raise ValueError(
                f"{what}: fn contracts no leaf with its input as a weight, so there is no "
                f"default target; the tree holds {_examples(entries)}. A weight that reaches "
                "its matmul through an operation whose layout cannot be read is not found: "
                f"{fix[:-1]}, and layout= for it.")
        if not chosen:
            raise _no_default(what, entries, fix)
        return chosen
    if callable(targets) and not isinstance(targets, re.Pattern):
        chosen = [e for e in entries if targets(e[0], e[2])]
        if not chosen:
            raise ValueError(f"{what}: the targets predicate matched no leaf; the tree holds "
                             f"{_examples(entries)}.")
        return chosen
    seen: set[str] = set()
    for pat in _patterns(what, targets, fix):
        if not isinstance(pat, (str, re.Pattern)):
            raise TypeError(f"{what}: each target must be a regex string, got {pat!r}. {fix}")
        rx = checks.regex(what, "target", pat)
        hits = [e[0] for e in entries if rx.search(e[0])]
        if not hits:
            raise ValueError(f"{what}: target {rx.pattern!r} matches no leaf; the tree holds "
                             f"{_examples(entries)}.")
        seen.update(hits)
    return [e for e in entries if e[0] in seen]
