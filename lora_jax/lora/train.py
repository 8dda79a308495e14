"""Trainable vs frozen: split/combine with None holes, and the optax mask.

Only the ``trainable_fields`` of adapter nodes train (LoraWeight's ``a`` and
``b``; DoRA adds its magnitude ``m``); everything else — ``w0`` (array or
quantized codes), biases, norms, embeddings — is frozen.

Example:
    >>> import jax.numpy as jnp, optax
    >>> p = lorafy({"k": jnp.ones((5, 7))}, rank=2, targets="k")
    >>> trainable, frozen = split(p)
    >>> trainable["k"].w0 is None and frozen["k"].a is None
    True
    >>> combine(trainable, frozen)["k"].shape
    (5, 7)
    >>> tx = lora_optimizer(optax.adam(1e-3), p)   # Adam state for A and B only
    >>> state = tx.init(p)
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from lora_jax.core import checks, is_implicit, path_str
from lora_jax.lora.weight import is_adapter


def _map_adapters(fn_node, fn_other, tree):
    return jax.tree.map(lambda x: fn_node(x) if is_adapter(x) else fn_other(x), tree,
                        is_leaf=is_adapter)


def _data_fields(node):
    return [f.name for f in dataclasses.fields(node) if not f.metadata.get("static")]


def _fill(node, trainable_value, frozen_value):
    """``node``: trainable fields mapped by ``trainable_value``, the rest by ``frozen_value``."""
    keep = type(node).trainable_fields
    return dataclasses.replace(node, **{
        f: (trainable_value if f in keep else frozen_value)(getattr(node, f))
        for f in _data_fields(node)})


def trainable_mask(params):
    """A tree of bools with the structure of ``params``: True on adapter leaves (A, B, ...).

    Use with ``optax.masked(tx, mask)``; frozen leaves then get no optimizer state.
    """
    def false(x):
        return jax.tree.map(lambda _: False, x)

    def true(x):
        return jax.tree.map(lambda _: True, x)
    return _map_adapters(lambda n: _fill(n, true, false), false, params)


def trainable_labels(params):
    """``"trainable"`` on LoRA A/B leaves, ``"frozen"`` elsewhere: labels for ``optax.partition``.

    The result has the structure of ``params``; for an Equinox module (which
    optax would call as a function) pass ``lambda p: trainable_labels(p)``.
    """
    return jax.tree.map(lambda m: "trainable" if m else "frozen", trainable_mask(params))


def _has_adapter(params) -> bool:
    return any(is_adapter(x) for x in jax.tree.leaves(params, is_leaf=is_adapter))


def lora_optimizer(tx, params):
    """``tx`` on A/B, zero updates (and no state) for every other leaf.

    ``optax.masked(tx, mask)`` alone passes masked-out gradients through
    unchanged, so a full-tree step would still move biases and norms; this
    pairs it with ``optax.set_to_zero`` for the frozen leaves. ``params`` must
    hold adapter nodes: without any, every update would be zero.
    """
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(f"lora_optimizer: tx must be an optax GradientTransformation, got "
                        f"{type(tx).__name__}; pass e.g. optax.adam(1e-3).")
    checks.tree("lora_optimizer", "params", params)
    if not _has_adapter(params):
        raise ValueError("lora_optimizer: params hold no adapter node (LoraWeight, DoraWeight, "
                         "...), so every update would be zero; lorafy() them first.")
    # A callable, because optax calls a callable labels tree, and an Equinox module is one.
    return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()},
                           lambda p: trainable_labels(p))


def split(params):
    """``(trainable, frozen)``: two trees shaped like ``params`` with ``None`` holes.

    ``trainable`` holds LoRA A/B; ``frozen`` holds everything else. Differentiate
    with respect to ``trainable`` only, so no full-size weight gradient is ever formed.
    A tree without adapter nodes is refused: its trainable half would be empty.
    """
    checks.tree("split", "params", params)
    if not _has_adapter(params):
        raise ValueError("split: params hold no adapter node (LoraWeight, DoraWeight, ...), so "
                         "the trainable half would be empty; lorafy() them first.")
    keep, drop = (lambda x: x), (lambda x: None)
    trainable = _map_adapters(lambda n: _fill(n, keep, drop), drop, params)
    frozen = _map_adapters(lambda n: _fill(n, drop, keep), keep, params)
    return trainable, frozen


_COMBINE_FIX = ("combine the two halves of one split() (the same lorafy targets, rank, alpha, "
                "rslora and layout on both sides).")


def _flat(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or is_implicit(x))
    return [path_str(p) for p, _ in flat], [x for _, x in flat], treedef


def _kind(x) -> str:
    return type(x).__name__ if is_implicit(x) else ("an array" if hasattr(x, "shape")
                                                    else type(x).__name__)


def _check_paths(paths: list[list[str]]) -> None:
    for i, ps in enumerate(paths[1:], 1):
        if ps == paths[0]:
            continue
        have0, have = set(paths[0]), set(ps)
        extra = [p for p in ps if p not in have0]
        missing = [p for p in paths[0] if p not in have]
        if missing:
            msg = f"leaf {missing[0]!r} of tree 0 is missing from tree {i}"
        elif extra:
            msg = f"tree {i} has a leaf {extra[0]!r} that tree 0 lacks"
        else:
            k = next(j for j, (p, q) in enumerate(zip(paths[0], ps)) if p != q)
            msg = f"leaf {paths[0][k]!r} of tree 0 meets {ps[k]!r} of tree {i} (another order)"
        raise ValueError(f"combine: {msg}; {_COMBINE_FIX}")


def _merge_nodes(path: str, xs: list):
    """One node from the same node in every tree: static fields equal, holes filled."""
    x0 = xs[0]
    for i, x in enumerate(xs[1:], 1):
        if type(x) is not type(x0):
            raise ValueError(f"combine: leaf {path!r} is a {_kind(x0)} in tree 0 but "
                             f"{_kind(x)} in tree {i}; {_COMBINE_FIX}")
        for f in dataclasses.fields(x0):
            if f.metadata.get("static") and getattr(x, f.name) != getattr(x0, f.name):
                hint = " (lorafy's alpha defaults to the rank)" if f.name == "alpha" else ""
                raise ValueError(
                    f"combine: leaf {path!r}: {f.name} is {getattr(x0, f.name)!r} in tree 0 but "
                    f"{getattr(x, f.name)!r} in tree {i}{hint}; {_COMBINE_FIX}")
    fields = {f: _merge(f"{path}/{f}", [getattr(x, f) for x in xs]) for f in _data_fields(x0)}
    check = getattr(type(x0), "check_parts", None)
    if check is not None:
        problem = check(fields, x0)
        if problem:
            raise ValueError(f"combine: leaf {path!r}: {problem}; {_COMBINE_FIX}")
    return dataclasses.replace(x0, **fields)


def _merge(path: str, xs: list):
    given = [x for x in xs if x is not None]
    if len(given) <= 1:
        return given[0] if given else None
    nodes = [x for x in given if is_implicit(x)]
    if nodes and len(nodes) != len(given):
        i0 = next(i for i, x in enumerate(xs) if x is not None and is_implicit(x))
        i1 = next(i for i, x in enumerate(xs) if x is not None and not is_implicit(x))
        raise ValueError(f"combine: leaf {path!r} is a {_kind(xs[i0])} in tree {i0} but "
                         f"{_kind(xs[i1])} in tree {i1}; {_COMBINE_FIX}")
    return _merge_nodes(path, given) if nodes else given[0]


def combine(*trees):
    """Inverse of :func:`split`: fill each ``None`` hole from the next tree that has a value.

    The trees must have the same leaves; adapter nodes must agree on their static
    fields (alpha, rslora, layout) and their factors must fit the base. Otherwise
    ``ValueError`` names the first leaf path that differs and how.
    """
    if not trees:
        raise TypeError("combine: pass the trees to combine, e.g. combine(trainable, frozen).")
    for i, t in enumerate(trees):
        checks.tree("combine", f"tree {i}", t)
    flats = [_flat(t) for t in trees]
    _check_paths([p for p, _, _ in flats])
    paths, _, treedef = flats[0]
    out = [_merge(path, [f[1][k] for f in flats]) for k, path in enumerate(paths)]
    return jax.tree_util.tree_unflatten(treedef, out)


def count_params(params) -> dict:
    """Element counts: ``{"trainable", "frozen", "total", "trainable_fraction"}``.

    ``frozen`` counts the logical elements of the base (a quantized weight counts
    its dequantized size), so the fraction is relative to the model, not its bytes.
    """
    checks.tree("count_params", "params", params)
    trainable, frozen = 0, 0
    for leaf in jax.tree.leaves(params, is_leaf=is_adapter):
        if is_adapter(leaf):
            for f in _data_fields(leaf):
                v = getattr(leaf, f)
                if f in type(leaf).trainable_fields:
                    trainable += sum(_logical_size(x) for x in jax.tree.leaves(v))
                elif f == "w0":
                    frozen += _logical_size(v)
        else:
            frozen += _logical_size(leaf)
    total = trainable + frozen
    return {"trainable": trainable, "frozen": frozen, "total": total,
            "trainable_fraction": trainable / total if total else 0.0}


def _logical_size(x) -> int:
    if x is None:
        return 0
    shape = getattr(x, "shape", ())
    n = 1
    for d in shape:
        n *= int(d)
    return n
