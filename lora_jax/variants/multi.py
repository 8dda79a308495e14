"""Several named adapters over one frozen base: stacking, per-row selection, combination.

One tree holds N adapters: every adapted leaf becomes a :class:`MultiLoraWeight` whose
A/B carry an adapter axis right after the stacked-layer axes::

    w0: [*S, *I, *O]       (shared, frozen; array or QuantizedWeight)
    a:  [*S, N, *I, r]     (r = the largest rank; smaller adapters are zero-padded)
    b:  [*S, N, r, *O]
    ids: [*S, B] int32     (per batch row: adapter index, -1 = base; None until set)

The adapter axis comes *after* S (not first) so that ``lax.scan`` / ``nn.scan`` over
stacked layers slices ``w0``, ``a``, ``b`` and ``ids`` along axis 0 alike; ``ids`` is
broadcast over S for the same reason. Names, ranks, alphas and rsLoRA flags are static.

**Per-row contract.** ``with_adapter_ids(params, ids)`` sets ``ids`` (length B, ints or
names; ``-1``/``None`` = base). Under :func:`lora_jax.lora`, where such a weight meets
``dot_general`` as ``x @ W`` (W the rhs, contracted over its input axes), **axis 0 of
``x`` is the batch-row axis** and must have length B. The base product ``x @ w0`` is
computed once for the whole batch; the adapter part gathers each row's A/B
(``a[ids]: [B, *I, r]``) and runs two batched matmuls, ``((x @ a[ids]) * s[ids]) @ b[ids]``;
rows with id -1 get exactly the base output. ``ids`` are data: switching which
adapter each row uses, or replacing an adapter's weights under the same name
(:func:`set_adapter`), never recompiles. Adding or removing an adapter changes N and the
static names, so a jitted function retraces once for the new set. Under jit,
out-of-range ids cannot raise; they act as the base (``with_adapter_ids`` checks
concrete ids and raises ``ValueError``). Any other use of the weight (a gather, a
transpose, the weight as lhs) raises ``TypeError``: a per-row weight has no single
dense form.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import lorafy, lora
    >>> base = {"k": jnp.ones((5, 7))}
    >>> ad = {n: lorafy(base, rank=2, targets="k", key=jax.random.key(i))
    ...       for i, n in enumerate(["fr", "de"])}
    >>> mp = stack_adapters(ad)
    >>> mp["k"].a.shape, adapter_names(mp)
    ((2, 5, 2), ('fr', 'de'))
    >>> y = lora(lambda p, x: x @ p["k"])(with_adapter_ids(mp, ["de", None, "fr"]), jnp.ones((3, 5)))
    >>> y.shape
    (3, 7)
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax.core import compat as _compat
from lora_jax.lora import transform as _transform
from lora_jax.core.tree import path_str
from lora_jax.lora.weight import AdapterNode, LoraWeight, lora_scale
from lora_jax.core.implicit import dense as _dense, node as _node, is_implicit, static

__all__ = [
    "MultiLoraWeight",
    "stack_adapters",
    "unstack_adapter",
    "adapter_names",
    "adapter_ids",
    "with_adapter_ids",
    "set_adapter",
    "add_adapter",
    "remove_adapter",
    "add_weighted_adapter",
    "save_adapters",
    "restore_adapters",
    "to_peft_adapters",
]

BASE = -1


@_node
@dataclasses.dataclass(frozen=True)
class MultiLoraWeight(AdapterNode):
    """N named LoRA adapters over one base weight; see the module docstring for shapes."""

    w0: Any
    a: Any
    b: Any
    ids: Any = None
    names: tuple = static(())
    ranks: tuple = static(())       # true rank per adapter (0: no LoRA on this leaf)
    alphas: tuple = static(())
    rsloras: tuple = static(())
    in_ndim: int = static(1)

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    @property
    def num_adapters(self) -> int:
        return len(self.names)

    @property
    def stack_ndim(self) -> int:
        return self.a.ndim - self.in_ndim - 2

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(0.0 if r == 0 else lora_scale(al, r, rs)
                     for r, al, rs in zip(self.ranks, self.alphas, self.rsloras))

    def adapter(self, index: int):
        """Adapter ``index`` as a :class:`LoraWeight` (or ``w0`` if it has no LoRA here)."""
        r = self.ranks[index]
        if r == 0:
            return self.w0
        s = self.stack_ndim
        a = jnp.take(self.a, index, axis=s)[..., :r]
        b = lax.slice_in_dim(jnp.take(self.b, index, axis=s), 0, r, axis=s)
        return LoraWeight(self.w0, a, b, alpha=self.alphas[index], rslora=self.rsloras[index],
                          in_ndim=self.in_ndim)

    def materialize(self):
        raise TypeError(
            "MultiLoraWeight holds one weight per batch row and has no single dense form. "
            "Under lora(fn) it supports dot_general as x @ W with the batch-row axis first "
            "(every Dense/einsum projection); for anything else pick one adapter with "
            "unstack_adapter(params, name).")

    def astype(self, dtype) -> "MultiLoraWeight":
        return dataclasses.replace(self, w0=self.w0.astype(dtype), a=self.a.astype(dtype),
                                   b=self.b.astype(dtype))


def _is_multi(x) -> bool:
    return isinstance(x, MultiLoraWeight)


# ----------------------------------------------------------------------------- dot rule

def _multi_dot_rule(eqn, invals, ctx):
    lhs, w = invals
    if not isinstance(w, MultiLoraWeight) or is_implicit(lhs):
        raise TypeError(
            "MultiLoraWeight: only x @ W (the weight as the right operand of dot_general) is "
            "supported; pick one adapter with unstack_adapter(params, name) for other uses.")
    if w.ids is None:
        raise ValueError("MultiLoraWeight used without adapter ids: call "
                         "with_adapter_ids(params, ids) (one id per batch row, -1 = base).")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    s, n_in = w.stack_ndim, w.in_ndim
    if s or lb or rb:
        raise TypeError(
            f"MultiLoraWeight of shape {w.shape} with {s} stacked axes met dot_general "
            "directly; apply it under lax.scan/nn.scan over the stacked axes (which slices it "
            "per layer), or unstack the layers first.")
    if set(rc) != set(range(n_in)):
        raise TypeError(
            f"MultiLoraWeight: dot_general contracts weight axes {tuple(rc)}, not its input axes "
            f"{tuple(range(n_in))} (a tied-embedding 'attend' or transposed use is not supported).")
    if 0 in lc:
        raise TypeError("MultiLoraWeight: axis 0 of the activation must be the batch-row axis, "
                        "but dot_general contracts it.")
    ids = w.ids
    if ids.ndim != 1 or lhs.shape[0] != ids.shape[0]:
        raise ValueError(
            f"MultiLoraWeight: {ids.shape[-1]} adapter ids for an activation of shape "
            f"{lhs.shape}; axis 0 (the batch rows) must have one id per row.")
    precision = eqn.params.get("precision")
    pet = eqn.params.get("preferred_element_type")
    base = _compat.bind(eqn, lhs, lax.stop_gradient(_dense(w.w0)))
    n = w.a.shape[0]
    valid = (ids >= 0) & (ids < n)
    idx = jnp.where(valid, ids, 0)
    row_scale = jnp.where(valid, jnp.asarray(w.scales, lhs.dtype)[idx],
                          jnp.zeros((), lhs.dtype))                       # [B]
    a_g = jnp.take(w.a, idx, axis=0).astype(lhs.dtype)                  # [B, *I, r]
    b_g = jnp.take(w.b, idx, axis=0).astype(lhs.dtype)                  # [B, r, *O]
    ac = tuple(j + 1 for j in rc)
    t = lax.dot_general(lhs, a_g, ((tuple(lc), ac), ((0,), (0,))), precision=precision)
    t = t * row_scale.reshape((-1, *(1,) * (t.ndim - 1)))               # [B, x_rest, r]
    d = lax.dot_general(t, b_g, (((t.ndim - 1,), (1,)), ((0,), (0,))),
                        precision=precision, preferred_element_type=pet)  # [B, x_rest, *O]
    return base + d.astype(base.dtype)


_transform.register_dot_rule(MultiLoraWeight, _multi_dot_rule)


# ----------------------------------------------------------------------------- stack / unstack

def _flat_lora(tree):
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, LoraWeight) or hasattr(type(x), "trainable_fields"))
    return [(path_str(kp), leaf) for kp, leaf in flat], treedef


def _check_names(names):
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"adapter names must be non-empty strings, got {n!r}.")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {list(names)}.")


def _stack(adapters: Mapping[str, Any], *, pad_ranks: bool, rank: int | None = None):
    names = tuple(adapters)
    if not names:
        raise ValueError("stack_adapters: no adapters given.")
    _check_names(names)
    flats = {}
    treedef0 = None
    for name in names:
        flat, treedef = _flat_lora(adapters[name])
        if any(isinstance(x, MultiLoraWeight) for _, x in flat):
            raise TypeError(f"stack_adapters: adapter {name!r} is already stacked; "
                            "unstack_adapter() it first.")
        other = [(p, type(x).__name__) for p, x in flat
                 if hasattr(type(x), "trainable_fields") and not isinstance(x, LoraWeight)]
        if other:
            raise TypeError(f"stack_adapters: adapter {name!r} has a {other[0][1]} at "
                            f"{other[0][0]!r}; only plain LoRA adapters (LoraWeight) can be "
                            "stacked (merge() a DoRA adapter, or serve it alone).")
        if treedef0 is None:
            treedef0 = [p for p, _ in flat]
        elif [p for p, _ in flat] != treedef0:
            raise ValueError(f"stack_adapters: adapter {name!r} has another tree structure than "
                             f"{names[0]!r}; all adapters must be lorafied from the same base.")
        flats[name] = flat
    out = []
    n_lora = 0
    for i, (path, leaf0) in enumerate(flats[names[0]]):
        leaves = [flats[n][i][1] for n in names]
        loras = [x for x in leaves if isinstance(x, LoraWeight)]
        if not loras:
            out.append(leaf0)
            continue
        n_lora += 1
        ref = loras[0]
        w0 = ref.w0
        for n, x in zip(names, leaves):
            shape = x.shape if hasattr(x, "shape") else None
            if shape != ref.shape:
                raise ValueError(f"stack_adapters: leaf {path!r} of adapter {n!r} has shape "
                                 f"{shape}, others {ref.shape}; adapters need the same base.")
            if isinstance(x, LoraWeight):
                if x.a is None or x.b is None or x.w0 is None:
                    raise ValueError(f"stack_adapters: leaf {path!r} of adapter {n!r} lacks "
                                     "w0/a/b (a half from split?); stack full trees.")
                if x.in_ndim != ref.in_ndim or x.stack_ndim != ref.stack_ndim:
                    raise ValueError(f"stack_adapters: leaf {path!r}: adapters disagree on the "
                                     "layout (in_ndim / stacked axes).")
        ranks = tuple(x.rank if isinstance(x, LoraWeight) else 0 for x in leaves)
        present = sorted({r for r in ranks if r})
        if len(present) > 1 and not pad_ranks:
            raise ValueError(
                f"stack_adapters: leaf {path!r} has ranks "
                f"{dict((n, r) for n, r in zip(names, ranks) if r)}; stacking needs one rank. "
                "Pass pad_ranks=True to zero-pad the smaller adapters (exact: the padding "
                "contributes nothing), or give them the same rank.")
        rmax = max(present) if rank is None else rank
        if rmax < max(present):
            raise ValueError(f"stack_adapters: rank {rmax} < the largest rank {max(present)} "
                             f"at leaf {path!r}.")
        s, n_in = ref.stack_ndim, ref.in_ndim
        S, I, O = ref.shape[:s], ref.shape[s:s + n_in], ref.shape[s + n_in:]
        dt_a, dt_b = ref.a.dtype, ref.b.dtype
        a_list, b_list = [], []
        for x, r in zip(leaves, ranks):
            if r == 0:
                a_list.append(jnp.zeros((*S, *I, rmax), dt_a))
                b_list.append(jnp.zeros((*S, rmax, *O), dt_b))
                continue
            a_, b_ = x.a.astype(dt_a), x.b.astype(dt_b)
            if r < rmax:
                a_ = jnp.pad(a_, [(0, 0)] * (a_.ndim - 1) + [(0, rmax - r)])
                b_ = jnp.pad(b_, [(0, 0)] * s + [(0, rmax - r)] + [(0, 0)] * len(O))
            a_list.append(a_)
            b_list.append(b_)
        out.append(MultiLoraWeight(
            w0=w0, a=jnp.stack(a_list, axis=s), b=jnp.stack(b_list, axis=s), ids=None,
            names=names, ranks=ranks,
            alphas=tuple(float(x.alpha) if isinstance(x, LoraWeight) else 0.0 for x in leaves),
            rsloras=tuple(bool(x.rslora) if isinstance(x, LoraWeight) else False for x in leaves),
            in_ndim=n_in))
    if not n_lora:
        raise ValueError("stack_adapters: no adapter holds a LoraWeight; lorafy() them first.")
    treedef = _flat_lora(adapters[names[0]])[1]
    return jax.tree_util.tree_unflatten(treedef, out)


def stack_adapters(adapters: Mapping[str, Any], *, pad_ranks: bool = False):
    """One tree holding every adapter of ``{name: lorafied params}`` (same base).

    Leaves that are LoraWeight in any adapter become a :class:`MultiLoraWeight` (an
    adapter without LoRA on that leaf gets rank 0 there: exactly the base). Other leaves
    (the frozen base) come from the first adapter. Different ranks on one leaf raise
    ``ValueError`` unless ``pad_ranks=True`` (zero padding to the largest rank; exact).
    """
    if not isinstance(adapters, Mapping):
        raise TypeError("stack_adapters: pass a mapping {name: lorafied params}.")
    return _stack(adapters, pad_ranks=pad_ranks)


def _multis(params) -> list[MultiLoraWeight]:
    ms = [x for x in jax.tree.leaves(params, is_leaf=_is_multi) if _is_multi(x)]
    if not ms:
        raise ValueError("params hold no MultiLoraWeight; build them with stack_adapters().")
    return ms


def adapter_names(params) -> tuple[str, ...]:
    """The adapter names of a stacked tree, in index order."""
    return _multis(params)[0].names


def _index(names, name) -> int:
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if not -len(names) <= name < len(names):
            raise ValueError(f"adapter index {name} out of range for {len(names)} adapters "
                             f"{list(names)}.")
        return int(name) % len(names)
    if name not in names:
        raise ValueError(f"unknown adapter {name!r}; this tree holds {list(names)} "
                         "(add it with add_adapter).")
    return names.index(name)


def unstack_adapter(params, name):
    """The single-adapter tree (LoraWeight nodes) of adapter ``name`` (or its index)."""
    names = adapter_names(params)
    i = _index(names, name)
    return jax.tree.map(lambda x: x.adapter(i) if _is_multi(x) else x, params, is_leaf=_is_multi)


def adapter_ids(params, rows: Sequence) -> jax.Array:
    """int32 ids for ``rows``: adapter names or indices, ``None`` / ``-1`` = base."""
    names = adapter_names(params)
    out = []
    for r in rows:
        if r is None or (isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r == BASE):
            out.append(BASE)
        else:
            if isinstance(r, (int, np.integer)) and r < 0:
                raise ValueError(f"adapter index {r} out of range for {len(names)} adapters "
                                 f"{list(names)}; use -1 (or None) for the base model.")
            out.append(_index(names, r))
    return jnp.asarray(out, jnp.int32)


def with_adapter_ids(params, ids):
    """``params`` with every MultiLoraWeight routing batch row ``i`` to adapter ``ids[i]``.

    ``ids``: an int array [B] (``-1`` = base) or a sequence of names / indices / ``None``.
    Concrete ids are range-checked; traced ids (inside jit) are not (out of range = base).
    """
    ms = _multis(params)
    names = ms[0].names
    if any(m.names != names for m in ms):
        raise ValueError("with_adapter_ids: MultiLoraWeight leaves disagree on adapter names.")
    if not isinstance(ids, jax.Array) and not isinstance(ids, np.ndarray):
        ids = adapter_ids(params, list(ids))
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim != 1:
        raise ValueError(f"with_adapter_ids: ids must be a 1-D int array (one per batch row), "
                         f"got {ids.dtype}{list(ids.shape)}.")
    if not isinstance(ids, jax.core.Tracer):
        host = np.asarray(ids)
        bad = host[(host < BASE) | (host >= len(names))]
        if bad.size:
            raise ValueError(f"with_adapter_ids: adapter index {int(bad[0])} out of range for "
                             f"{len(names)} adapters {list(names)}; use -1 for the base model.")
    ids = ids.astype(jnp.int32)

    def put(m):
        if not _is_multi(m):
            return m
        s = m.stack_ndim
        full = jnp.broadcast_to(ids, (*m.a.shape[:s], ids.shape[0]))
        return dataclasses.replace(m, ids=full)
    return jax.tree.map(put, params, is_leaf=_is_multi)


def _all(params) -> dict:
    return {n: unstack_adapter(params, n) for n in adapter_names(params)}


def set_adapter(params, name, adapter):
    """Replace adapter ``name``'s A/B with those of the single-adapter tree ``adapter``.

    Same rank (or smaller: zero-padded) and alpha as before: the stacked shapes and
    static fields stay the same, so jitted functions do not recompile."""
    names = adapter_names(params)
    i = _index(names, name)
    ad = _all(params)
    ad[names[i]] = adapter
    out = _stack(ad, pad_ranks=True, rank=None)
    # keep the padded rank of each leaf
    flat_new, treedef = _flat_lora(out)
    flat_old, _ = _flat_lora(params)
    leaves = []
    for (p, new), (_, old) in zip(flat_new, flat_old):
        if _is_multi(new) and _is_multi(old) and new.rank < old.rank:
            s = new.stack_ndim
            pad = old.rank - new.rank
            a = jnp.pad(new.a, [(0, 0)] * (new.a.ndim - 1) + [(0, pad)])
            b = jnp.pad(new.b, [(0, 0)] * (s + 1) + [(0, pad)] + [(0, 0)] * (new.b.ndim - s - 2))
            new = dataclasses.replace(new, a=a, b=b)
        if _is_multi(new) and _is_multi(old) and new.rank > old.rank:
            raise ValueError(f"set_adapter: adapter {names[i]!r} has rank {new.rank} at leaf "
                             f"{p!r}, more than the stacked rank {old.rank}.")
        if _is_multi(old) and old.ids is not None and _is_multi(new):
            new = dataclasses.replace(new, ids=old.ids)
        leaves.append(new)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def add_adapter(params, name: str, adapter, *, pad_ranks: bool = True):
    """A new stacked tree with ``adapter`` appended as ``name`` (N grows: retraces once)."""
    names = adapter_names(params)
    if name in names:
        raise ValueError(f"add_adapter: adapter {name!r} exists already; use set_adapter().")
    ad = _all(params)
    ad[name] = adapter
    return _stack(ad, pad_ranks=pad_ranks)


def remove_adapter(params, name):
    """A new stacked tree without adapter ``name``."""
    names = adapter_names(params)
    i = _index(names, name)
    if len(names) == 1:
        raise ValueError("remove_adapter: cannot remove the only adapter; use "
                         "unstack_adapter / the base params instead.")
    ad = _all(params)
    del ad[names[i]]
    return _stack(ad, pad_ranks=True)


# ----------------------------------------------------------------------------- combination

def _has_multi(tree) -> bool:
    return any(_is_multi(x) for x in jax.tree.leaves(tree, is_leaf=_is_multi))


def _as_mapping(adapters, names):
    if isinstance(adapters, Mapping) and not _has_multi(adapters):
        if names is not None:
            missing = [n for n in names if n not in adapters]
            if missing:
                raise ValueError(f"unknown adapter(s) {missing}; given {list(adapters)}.")
            return {n: adapters[n] for n in names}
        return dict(adapters)
    all_names = adapter_names(adapters)
    names = list(all_names) if names is None else list(names)
    return {n: unstack_adapter(adapters, n) for n in names}


def _flatten_layers(w: LoraWeight):
    s, n_in = w.stack_ndim, w.in_ndim
    shape = w.shape
    S, I, O = shape[:s], shape[s:s + n_in], shape[s + n_in:]
    P, fi, fo = math.prod(S), math.prod(I), math.prod(O)
    a = w.a.astype(jnp.float32).reshape(P, fi, w.rank)
    b = w.b.astype(jnp.float32).reshape(P, w.rank, fo)
    return a, b, (S, I, O)


def add_weighted_adapter(adapters, weights: Sequence[float], *, combination_type: str = "svd",
                         svd_rank: int | None = None, svd_clamp: float | None = None,
                         names: Sequence[str] | None = None):
    """A new single adapter combining ``adapters`` with ``weights``, as PEFT's
    ``add_weighted_adapter`` (peft 0.21 semantics).

    ``adapters``: ``{name: lorafied params}`` over one base, or a stacked tree (then
    ``names`` picks and orders the adapters; default all). On each leaf, with
    ``delta_i = s_i * a_i @ b_i``:

    * ``"cat"``: exact, rank = sum of ranks: ``a = [w_1 s_1 a_1 | w_2 s_2 a_2 | ...]``,
      ``b = [b_1; b_2; ...]``, scale 1 (alpha = rank), so ``delta = sum w_i delta_i``.
    * ``"svd"``: the top-``svd_rank`` SVD of ``sum w_i delta_i`` (default rank: the largest
      input rank; at most ``min(in, out)`` of the leaf): ``a = U_k``, ``b = S_k Vh_k``,
      scale 1; ``svd_clamp`` clamps both factors to that quantile of their values, as PEFT.
    * ``"linear"``: same ranks only: ``a = sum sign_i sqrt|w_i s_i| a_i``,
      ``b = sum sqrt|w_i s_i| b_i``, scale 1 (an approximation, as in PEFT).

    A leaf that only some adapters adapt combines those that do (as PEFT).
    Differences from PEFT: the new adapter's scale is always 1 (PEFT copies
    ``use_rslora`` from the first adapter's config, which rescales a cat/svd result
    by ``sqrt(rank)`` when it is set); ranks are per leaf (PEFT pads every module to
    the config-wide rank with zeros; the products are identical).
    """
    ad = _as_mapping(adapters, names)
    ws = [float(w) for w in weights]
    if len(ws) != len(ad):
        raise ValueError(f"add_weighted_adapter: {len(ws)} weights for {len(ad)} adapters "
                         f"{list(ad)}.")
    if not ad:
        raise ValueError("add_weighted_adapter: no adapters given.")
    if combination_type not in ("cat", "svd", "linear"):
        raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} is not "
                         "supported; use 'cat' (exact), 'svd' (truncated) or 'linear'.")
    if len(ad) == 1:
        combination_type = "linear"       # as PEFT: one adapter merges linearly
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise ValueError(f"add_weighted_adapter: svd_rank must be a positive int, got {svd_rank!r}.")
    lists = {n: _flat_lora(t)[0] for n, t in ad.items()}
    first = next(iter(ad))
    flat, treedef = _flat_lora(ad[first])
    for n, fl in lists.items():
        if [p for p, _ in fl] != [p for p, _ in flat]:
            raise ValueError(f"add_weighted_adapter: adapter {n!r} has another tree structure "
                             f"than {first!r}; all adapters must be lorafied from the same base.")
    for n, fl in lists.items():
        for p, x in fl:
            if hasattr(type(x), "trainable_fields") and not isinstance(x, LoraWeight):
                raise TypeError(f"add_weighted_adapter: adapter {n!r} has a {type(x).__name__} "
                                f"at {p!r}; only plain LoRA adapters (LoraWeight) combine.")
    out = []
    for i, (path, leaf) in enumerate(flat):
        parts = [(lists[n][i][1], w) for n, w in zip(ad, ws) if isinstance(lists[n][i][1], LoraWeight)]
        if not parts:
            out.append(leaf)
            continue
        ref = parts[0][0]
        factors = [(_flatten_layers(x), w, x.scale) for x, w in parts]
        (S, I, O) = factors[0][0][2]
        if combination_type == "cat":
            a = jnp.concatenate([fa * (w * sc) for (fa, fb, _), w, sc in factors], axis=-1)
            b = jnp.concatenate([fb for (fa, fb, _), w, sc in factors], axis=1)
        elif combination_type == "linear":
            rs = {fa.shape[-1] for (fa, _, _), _, _ in factors}
            if len(rs) != 1:
                raise ValueError(f"add_weighted_adapter: 'linear' needs one rank, leaf {path!r} "
                                 f"has ranks {sorted(rs)}; use 'cat' or 'svd'.")
            a = sum(fa * (math.copysign(math.sqrt(abs(w * sc)), w * sc))
                    for (fa, _, _), w, sc in factors)
            b = sum(fb * math.sqrt(abs(w * sc)) for (_, fb, _), w, sc in factors)
        else:
            k = svd_rank or max(x.rank for x, _ in parts)
            fi, fo = math.prod(I), math.prod(O)
            k = min(k, fi, fo)     # a larger rank is exact already (PEFT ends up the same)
            delta = sum(jnp.einsum("pir,pro->pio", fa, fb, precision=lax.Precision.HIGHEST)
                        * (w * sc) for (fa, fb, _), w, sc in factors)
            u, sv, vh = jnp.linalg.svd(delta, full_matrices=False)
            a = u[:, :, :k]
            b = sv[:, :k, None] * vh[:, :k, :]
            if svd_clamp is not None:
                hi = jnp.quantile(jnp.concatenate([b.reshape(-1), a.reshape(-1)]), svd_clamp)
                a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
        r = a.shape[-1]
        out.append(LoraWeight(ref.w0, a.reshape((*S, *I, r)).astype(ref.a.dtype),
                              b.reshape((*S, r, *O)).astype(ref.b.dtype),
                              alpha=float(r), rslora=False, in_ndim=ref.in_ndim))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- checkpoints, PEFT

def save_adapters(directory, params, *, step: int, separate: bool = False, **kwargs):
    """Save every adapter of a stacked tree with :func:`lora_jax.save_adapter`.

    ``separate=False``: one checkpoint (one atomic commit) of the tree
    ``{name: unstack_adapter(params, name)}`` in ``directory``. ``separate=True``: one
    checkpoint root per adapter, ``directory/<name>/`` (each loadable on its own with
    ``restore_adapter``). ``kwargs`` go to ``save_adapter`` (``metadata``, ``keep``).
    Returns the step path, or ``{name: step path}``.
    """
    from lora_jax.checkpoint.adapter import save_adapter
    ad = _all(params)
    meta = dict(kwargs.pop("metadata", None) or {})
    meta["adapters"] = list(ad)
    if not separate:
        return save_adapter(directory, ad, step=step, metadata=meta, **kwargs)
    root = Path(os.fspath(directory))
    return {n: save_adapter(root / n, t, step=step, metadata=meta, **kwargs) for n, t in ad.items()}


def restore_adapters(directory, params, *, step: int | None = None, separate: bool = False,
                     names: Sequence[str] | None = None, **kwargs):
    """Inverse of :func:`save_adapters`: ``params`` is a stacked template (same names,
    ranks and base); returns it with every adapter's A/B restored. ``separate=True``
    restores ``directory/<name>/`` for each of ``names`` (default: the template's)."""
    from lora_jax.checkpoint.adapter import restore_adapter
    ad = _all(params)
    if names is not None:
        for n in names:
            _index(tuple(ad), n)
    if not separate:
        restored = restore_adapter(directory, ad, step=step, **kwargs)
        restored = {n: restored[n] for n in ad}      # pytree dicts come back key-sorted
    else:
        root = Path(os.fspath(directory))
        use = list(ad) if names is None else list(names)
        restored = dict(ad)
        for n in use:
            if not (root / n).is_dir():
                raise FileNotFoundError(f"restore_adapters: no checkpoint for adapter {n!r} at "
                                        f"{root / n}.")
            restored[n] = restore_adapter(root / n, ad[n], step=step, **kwargs)
    out = _stack(restored, pad_ranks=True, rank=None)
    # restore the template's padded ranks
    flat_new, treedef = _flat_lora(out)
    flat_old, _ = _flat_lora(params)
    leaves = []
    for (_, new), (_, old) in zip(flat_new, flat_old):
        if _is_multi(new) and new.rank < old.rank:
            s, pad = new.stack_ndim, old.rank - new.rank
            new = dataclasses.replace(
                new, a=jnp.pad(new.a, [(0, 0)] * (new.a.ndim - 1) + [(0, pad)]),
                b=jnp.pad(new.b, [(0, 0)] * (s + 1) + [(0, pad)] + [(0, 0)] * (new.b.ndim - s - 2)))
        leaves.append(new)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def to_peft_adapters(params, out_dir, **to_peft_kwargs) -> dict:
    """Export every adapter as PEFT's ``save_pretrained`` lays out several adapters:
    ``out_dir/<name>/`` per adapter, except one named ``"default"`` which goes in
    ``out_dir`` itself. Returns ``{name: path}``; load with
    ``PeftModel.from_pretrained(model, out_dir/<first>, adapter_name=<first>)`` then
    ``load_adapter(out_dir/<name>, adapter_name=<name>)``."""
    from lora_jax.interop.peft import to_peft
    root = Path(os.fspath(out_dir))
    paths = {}
    names = adapter_names(params)
    # "default" first: to_peft replaces its whole directory, which holds the others.
    for n in sorted(names, key=lambda n: n != "default"):
        dest = root if n == "default" else root / n
        paths[n] = to_peft(unstack_adapter(params, n), dest, **to_peft_kwargs)
    return paths
