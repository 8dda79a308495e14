"""Building and editing a stacked many-adapter tree: stack, set, add, remove.

Every leaf that is a LoraWeight (or DoraWeight) in any adapter becomes a
:class:`~lora_jax.variants.multi.MultiLoraWeight` (a
:class:`~lora_jax.variants.multi.MultiDoraWeight` where one is DoRA, holding the
magnitudes too); the adapters must share one base
(the same frozen ``w0`` on every leaf), which is checked: an adapter whose
initialisation rewrote its base (PiSSA, OLoRA) cannot share a batch with others.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lora_jax.core import checks, path_str
from lora_jax.lora import LoraWeight, is_adapter
from lora_jax.variants.dora import DoraWeight, is_lora_or_dora
from lora_jax.variants.multi import (
    MultiDoraWeight,
    MultiLoraWeight,
    _index,
    adapter_names,
    is_multi,
    unstack_adapter,
)


def flat_adapters(tree):
    """``([(path, leaf)], treedef)`` with adapter nodes as leaves."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_adapter)
    return [(path_str(kp), leaf) for kp, leaf in flat], treedef


def pad_rank(a, b, rank: int, stack_ndim: int):
    """Zero-pad factors ``a [..., r]`` / ``b [*S, (N,) r, *O]`` to ``rank`` (exact: the
    padding contributes nothing). ``stack_ndim`` counts the axes before b's rank axis."""
    pad = rank - a.shape[-1]
    if pad <= 0:
        return a, b
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
    b = jnp.pad(b, [(0, 0)] * stack_ndim + [(0, pad)] + [(0, 0)] * (b.ndim - stack_ndim - 1))
    return a, b


def _check_names(names):
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"adapter names must be non-empty strings, got {n!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {list(names)}.")


def _same_base(x, ref) -> bool:
    if x is ref:
        return True
    if jax.tree.structure(x) != jax.tree.structure(ref):      # kind, layout, block size
        return False
    lx, lr = jax.tree.leaves(x), jax.tree.leaves(ref)
    return len(lx) == len(lr) and all(
        a is b or (a.shape == b.shape and a.dtype == b.dtype
                   and bool(jnp.array_equal(a, b, equal_nan=True)))
        for a, b in zip(lx, lr))


def check_adapters(adapters: Mapping[str, Any], what: str, *, dora: bool = False) -> dict:
    """``{name: [(path, leaf)]}`` after checking the adapters are LoRA trees of one base
    (``dora``: DoRA adapters allowed too)."""
    names = tuple(adapters)
    if not names:
        raise ValueError(f"{what}: no adapters given.")
    _check_names(names)
    flats, paths0 = {}, None
    for name in names:
        checks.tree(what, f"adapter {name!r}", adapters[name])
        flat, _ = flat_adapters(adapters[name])
        for p, x in flat:
            if is_multi(x):
                raise TypeError(f"{what}: adapter {name!r} is already stacked; "
                                "unstack_adapter() it first.")
            if is_adapter(x) and not (isinstance(x, LoraWeight) or (dora and is_lora_or_dora(x))):
                kinds = "LoRA and DoRA adapters" if dora else "plain LoRA adapters (LoraWeight)"
                raise TypeError(f"{what}: adapter {name!r} has a {type(x).__name__} at {p!r}; "
                                f"only {kinds} can be combined here (merge() it, or serve it "
                                "alone).")
        if paths0 is None:
            paths0 = [p for p, _ in flat]
        elif [p for p, _ in flat] != paths0:
            raise ValueError(f"{what}: adapter {name!r} has another tree structure than "
                             f"{names[0]!r}; all adapters must be lorafied from the same base.")
        flats[name] = flat
    for i, path in enumerate(paths0):
        _check_leaf(what, path, {n: flats[n][i][1] for n in names})
    return flats


def _check_leaf(what, path, leaves: dict):
    loras = [x for x in leaves.values() if is_lora_or_dora(x)]
    if not loras:
        return
    ref = loras[0]
    for n, x in leaves.items():
        shape = tuple(x.shape) if hasattr(x, "shape") else None
        if shape != ref.shape:
            raise ValueError(f"{what}: leaf {path!r} of adapter {n!r} has shape {shape}, "
                             f"others {ref.shape}; adapters need the same base.")
        base = x.w0 if is_lora_or_dora(x) else x
        if base is None or (is_lora_or_dora(x) and (x.a is None or x.b is None)):
            raise ValueError(f"{what}: leaf {path!r} of adapter {n!r} lacks w0/a/b (a half "
                             "from split?); pass full trees.")
        if not _same_base(base, ref.w0):
            raise ValueError(
                f"{what}: adapter {n!r} has another base weight at {path!r} than the others "
                "(PiSSA/OLoRA rewrite w0; a merged or re-quantized base differs too). Adapters "
                "combined on one base must share it exactly.")
        if is_lora_or_dora(x) and (x.in_axes, x.stack_ndim) != (ref.in_axes, ref.stack_ndim):
            raise ValueError(f"{what}: leaf {path!r}: adapters disagree on the layout "
                             "(in_axes / stacked axes).")


def _stack_leaf(path, leaves: list, names, *, pad_ranks: bool, what: str):
    ref = next(x for x in leaves if is_lora_or_dora(x))
    if ref.in_axes != tuple(range(ref.in_ndim)):
        raise ValueError(
            f"{what}: leaf {path!r} has input axes {ref.in_axes}; many-adapter batches "
            "need the input axes first (the (in, out) layout). Exclude this leaf from lorafy's "
            "targets for multi-adapter serving.")
    ranks = tuple(x.rank if is_lora_or_dora(x) else 0 for x in leaves)
    present = sorted({r for r in ranks if r})
    if len(present) > 1 and not pad_ranks:
        raise ValueError(
            f"{what}: leaf {path!r} has ranks "
            f"{dict((n, r) for n, r in zip(names, ranks) if r)}; stacking needs one rank. "
            "Pass pad_ranks=True to zero-pad the smaller adapters (exact: the padding "
            "contributes nothing), or give them the same rank.")
    rmax = max(present)
    s = ref.stack_ndim
    a_list, b_list = [], []
    for x in leaves:
        if is_lora_or_dora(x):
            a_, b_ = pad_rank(x.a.astype(ref.a.dtype), x.b.astype(ref.b.dtype), rmax, s)
        else:
            a_ = jnp.zeros((*ref.a.shape[:-1], rmax), ref.a.dtype)
            b_ = jnp.zeros((*ref.b.shape[:s], rmax, *ref.b.shape[s + 1:]), ref.b.dtype)
        a_list.append(a_)
        b_list.append(b_)
    fields = dict(
        w0=ref.w0, a=jnp.stack(a_list, axis=s), b=jnp.stack(b_list, axis=s), ids=None,
        names=tuple(names), ranks=ranks,
        alphas=tuple(float(x.alpha) if is_lora_or_dora(x) else 0.0 for x in leaves),
        rsloras=tuple(bool(x.rslora) if is_lora_or_dora(x) else False for x in leaves),
        in_ndim=ref.in_ndim)
    doras = tuple(isinstance(x, DoraWeight) for x in leaves)
    if not any(doras):
        return MultiLoraWeight(**fields)
    # Zero padding keeps a@b, hence the norm; non-DoRA adapters' magnitudes are unused.
    dora = next(x for x in leaves if isinstance(x, DoraWeight))
    ms = [x.m.astype(dora.m.dtype) if isinstance(x, DoraWeight) else jnp.ones_like(dora.m)
          for x in leaves]
    return MultiDoraWeight(**fields, m=jnp.stack(ms, axis=s), doras=doras)


def _stack(adapters: Mapping[str, Any], *, pad_ranks: bool, what: str = "stack_adapters"):
    flats = check_adapters(adapters, what, dora=True)
    names = tuple(adapters)
    out = []
    for i, (path, leaf0) in enumerate(flats[names[0]]):
        leaves = [flats[n][i][1] for n in names]
        if any(is_lora_or_dora(x) for x in leaves):
            leaf0 = _stack_leaf(path, leaves, names, pad_ranks=pad_ranks, what=what)
        out.append(leaf0)
    if not any(is_multi(x) for x in out):
        raise ValueError(f"{what}: no adapter holds a LoraWeight; lorafy() them first.")
    return jax.tree_util.tree_unflatten(flat_adapters(adapters[names[0]])[1], out)


def stack_adapters(adapters: Mapping[str, Any], *, pad_ranks: bool = False):
    """One tree holding every adapter of ``{name: lorafied params}`` (same base).

    Leaves that are LoraWeight or DoraWeight in any adapter become a
    :class:`MultiLoraWeight` (:class:`MultiDoraWeight` if one is DoRA there; an
    adapter without LoRA on that leaf gets rank 0 there: exactly the base). Other leaves
    (the frozen base) come from the first adapter. Different ranks on one leaf raise
    ``ValueError`` unless ``pad_ranks=True`` (zero padding to the largest rank; exact).
    Adapters with different base weights raise ``ValueError`` naming the adapter.
    """
    if not isinstance(adapters, Mapping):
        raise TypeError(f"stack_adapters: adapters must be a mapping {{name: lorafied params}}, "
                        f"got {type(adapters).__name__}.")
    checks.boolean("stack_adapters", "pad_ranks", pad_ranks)
    return _stack(adapters, pad_ranks=pad_ranks)


def _all(params) -> dict:
    return {n: unstack_adapter(params, n) for n in adapter_names(params)}


def _check_new(params, name: str, adapter, what: str) -> None:
    """``adapter`` against the stacked tree's base first, so an error names it (not whichever
    adapter happens to come first in the stack)."""
    ref = "(the stacked tree)" if name != "(the stacked tree)" else "(stacked)"
    check_adapters({ref: unstack_adapter(params, 0), name: adapter}, what, dora=True)


def set_adapter(params, name, adapter):
    """Replace adapter ``name``'s A/B with those of the single-adapter tree ``adapter``.

    Same rank (or smaller: zero-padded) and alpha as before: the stacked shapes and
    static fields stay the same, so jitted functions do not recompile."""
    names = adapter_names(params)
    i = _index(names, name)
    _check_new(params, names[i], adapter, "set_adapter")
    ad = _all(params)
    ad[names[i]] = adapter
    out = _stack(ad, pad_ranks=True, what="set_adapter")
    # keep the padded rank of each leaf
    flat_new, treedef = flat_adapters(out)
    flat_old, _ = flat_adapters(params)
    leaves = []
    for (p, new), (_, old) in zip(flat_new, flat_old):
        if is_multi(new) and is_multi(old) and new.rank < old.rank:
            a, b = pad_rank(new.a, new.b, old.rank, new.stack_ndim + 1)
            new = dataclasses.replace(new, a=a, b=b)
        if is_multi(new) and is_multi(old) and new.rank > old.rank:
            raise ValueError(f"set_adapter: adapter {names[i]!r} has rank {new.rank} at leaf "
                             f"{p!r}, more than the stacked rank {old.rank}.")
        if is_multi(old) and old.ids is not None and is_multi(new):
            new = dataclasses.replace(new, ids=old.ids)
        leaves.append(new)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def add_adapter(params, name: str, adapter, *, pad_ranks: bool = True):
    """A new stacked tree with ``adapter`` appended as ``name`` (N grows: retraces once)."""
    names = adapter_names(params)
    if not isinstance(name, str) or not name:
        raise TypeError(f"add_adapter: name must be a non-empty string, got {name!r}.")
    if name in names:
        raise ValueError(f"add_adapter: adapter {name!r} exists already; use set_adapter().")
    checks.boolean("add_adapter", "pad_ranks", pad_ranks)
    _check_new(params, name, adapter, "add_adapter")
    ad = _all(params)
    ad[name] = adapter
    return _stack(ad, pad_ranks=pad_ranks, what="add_adapter")


def remove_adapter(params, name):
    """A new stacked tree without adapter ``name``."""
    names = adapter_names(params)
    i = _index(names, name)
    if len(names) == 1:
        raise ValueError("remove_adapter: cannot remove the only adapter; use "
                         "unstack_adapter / the base params instead.")
    ad = _all(params)
    del ad[names[i]]
    return _stack(ad, pad_ranks=True, what="remove_adapter")
