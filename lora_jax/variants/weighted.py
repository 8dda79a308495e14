"""Combining adapters into one (PEFT's ``add_weighted_adapter``: cat, svd, linear, TIES, DARE,
magnitude pruning), and :func:`safe_merge` (PEFT's ``merge_and_unload(safe_merge=True)``).

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.lora import LoraWeight
    >>> w = LoraWeight(jnp.zeros((3, 2)), jnp.full((3, 1), jnp.inf), jnp.ones((1, 2)), alpha=1.0)
    >>> safe_merge({"dense": {"kernel": w}})
    Traceback (most recent call last):
    ValueError: safe_merge: leaf 'dense/kernel' holds 6 non-finite value(s) (first inf at ...
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core import checks, is_implicit, path_str
from lora_jax.lora import LoraWeight
from lora_jax.variants.multi import adapter_names, is_multi, unstack_adapter
from lora_jax.variants.stack import check_adapters, flat_adapters
from lora_jax.variants.task_merge import COMBINATIONS, merge_task_tensors

_TYPES = ("cat", "svd", *COMBINATIONS, *(f"{c}_svd" for c in COMBINATIONS[1:]))


def _has_multi(tree) -> bool:
    return any(is_multi(x) for x in jax.tree.leaves(tree, is_leaf=is_multi))


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


def _check_args(adapters, weights, combination_type, svd_rank, svd_clamp, names, density,
                majority_sign_method, key) -> list:
    """The weights as floats, after checking every argument (a NaN weight would silently
    turn the combined adapter into NaN)."""
    what = "add_weighted_adapter"
    checks.tree(what, "adapters", adapters)
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"{what}: weights must be a list of numbers, one per adapter, got "
                        f"{type(weights).__name__}.")
    ws = [checks.number(what, f"weights[{i}]", w, positive=False) for i, w in enumerate(weights)]
    if combination_type not in _TYPES:
        raise ValueError(f"{what}: combination_type {combination_type!r} is not supported; use "
                         f"one of {list(_TYPES)}.")
    if svd_rank is not None:
        checks.positive_int(what, "svd_rank", svd_rank)
    if svd_clamp is not None and not 0 < checks.number(what, "svd_clamp", svd_clamp) <= 1:
        raise ValueError(f"{what}: svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}.")
    if names is not None and (isinstance(names, (str, bytes)) or not all(
            isinstance(n, str) for n in names)):
        raise TypeError(f"{what}: names must be a list of adapter names, got {names!r}.")
    _check_pruning(combination_type, density, majority_sign_method, key)
    return ws


def _check_pruning(combination_type, density, majority_sign_method, key) -> None:
    what = "add_weighted_adapter"
    checks.one_of(what, "majority_sign_method", majority_sign_method, ("total", "frequency"))
    prunes = combination_type.removesuffix("_svd") in COMBINATIONS[1:]
    if not prunes:
        if density is not None:
            raise ValueError(f"{what}: density is only used by the ties/dare/magnitude_prune "
                             f"types, not {combination_type!r}; drop it.")
        return
    if density is None:
        raise ValueError(f"{what}: combination_type {combination_type!r} needs density= (the "
                         "fraction of values kept, in [0, 1]).")
    if not 0 <= checks.number(what, "density", density, positive=False) <= 1:
        raise ValueError(f"{what}: density must be in [0, 1] (the fraction kept), got "
                         f"{density!r}.")
    if combination_type.startswith("dare") and density < 1:
        if key is None:
            raise ValueError(f"{what}: {combination_type!r} prunes at random; pass key= "
                             "(a jax.random key).")
        checks.prng_key(what, "key", key)


def _combine_leaf(factors, ctype: str, opts: dict, key, svd_rank, svd_clamp, fi_fo):
    """``(a [P, in, r'], b [P, r', out])`` of one leaf; ``factors``:
    ``[((a [P, in, r], b [P, r, out]), weight, scale)]`` of the adapters that adapt it."""
    if ctype == "cat":
        a = jnp.concatenate([fa * (w * sc) for (fa, fb), w, sc in factors], axis=-1)
        b = jnp.concatenate([fb for (fa, fb), w, sc in factors], axis=1)
        return a, b
    if not ctype.endswith("svd"):
        rs = {fa.shape[-1] for (fa, _), _, _ in factors}
        if len(rs) != 1:
            raise ValueError(f"{ctype!r} needs one rank, got ranks {sorted(rs)}; use 'cat' or "
                             "'svd'.")
        ka, kb = jax.random.split(key) if key is not None else (None, None)
        root = [math.sqrt(abs(w * sc)) for _, w, sc in factors]
        wa = jnp.asarray([math.copysign(r, w * sc) for r, (_, w, sc) in zip(root, factors)])
        a = merge_task_tensors(jnp.stack([fa for (fa, _), _, _ in factors]), wa, ctype,
                               key=ka, **opts)
        b = merge_task_tensors(jnp.stack([fb for (_, fb), _, _ in factors]),
                               jnp.asarray(root), ctype, key=kb, **opts)
        return a, b
    deltas = jnp.stack([jnp.einsum("pir,pro->pio", fa, fb, precision=lax.Precision.HIGHEST)
                        * sc for (fa, fb), _, sc in factors])
    base = "linear" if ctype == "svd" else ctype.removesuffix("_svd")
    delta = merge_task_tensors(deltas, jnp.asarray([w for _, w, _ in factors]), base, key=key,
                               **opts)
    k = min(svd_rank or max(fa.shape[-1] for (fa, _), _, _ in factors), *fi_fo)
    u, sv, vh = jnp.linalg.svd(delta, full_matrices=False)
    a, b = u[:, :, :k], sv[:, :k, None] * vh[:, :k, :]
    if svd_clamp is not None:
        hi = jnp.quantile(jnp.concatenate([b.reshape(-1), a.reshape(-1)]), svd_clamp)
        a, b = jnp.clip(a, -hi, hi), jnp.clip(b, -hi, hi)
    return a, b


def add_weighted_adapter(adapters, weights: Sequence[float], *, combination_type: str = "svd",
                         svd_rank: int | None = None, svd_clamp: float | None = None,
                         names: Sequence[str] | None = None, density: float | None = None,
                         majority_sign_method: str = "total", key: jax.Array | None = None):
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
    * ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: as ``"linear"``
      (same weights on A and on B) but A and B each merged by that method
      (:mod:`lora_jax.variants.task_merge`) with ``density`` (fraction kept) and
      ``majority_sign_method`` (``"total"`` or ``"frequency"``); the ``*_svd`` forms merge
      the ``delta_i`` with weights ``w_i`` that way, then truncate by SVD as ``"svd"``.
      DARE prunes at random: ``key`` is required (folded in per leaf, then split for A
      and B, or used for the delta).

    A leaf that only some adapters adapt combines those that do (as PEFT).
    Differences from PEFT: the new adapter's scale is always 1 (PEFT copies
    ``use_rslora`` from the first adapter's config, which rescales a cat/svd result
    by ``sqrt(rank)`` when it is set); ranks are per leaf (PEFT pads every module to
    the config-wide rank with zeros; the products are identical).
    """
    ws = _check_args(adapters, weights, combination_type, svd_rank, svd_clamp, names, density,
                     majority_sign_method, key)
    ad = _as_mapping(adapters, names)
    if len(ws) != len(ad):
        raise ValueError(f"add_weighted_adapter: {len(ws)} weights for {len(ad)} adapters "
                         f"{list(ad)}.")
    if not ad:
        raise ValueError("add_weighted_adapter: no adapters given.")
    if len(ad) == 1:
        combination_type = "linear"       # as PEFT: one adapter merges linearly
    opts = dict(density=density, majority_sign_method=majority_sign_method)
    lists = check_adapters(ad, "add_weighted_adapter")
    flat, treedef = flat_adapters(ad[next(iter(ad))])
    out = []
    for i, (path, leaf) in enumerate(flat):
        parts = [(lists[n][i][1], w) for n, w in zip(ad, ws)
                 if isinstance(lists[n][i][1], LoraWeight)]
        if not parts:
            out.append(leaf)
            continue
        ref = parts[0][0]
        factors = [(_flatten_layers(x)[:2], w, x.scale) for x, w in parts]
        (S, I, O) = _flatten_layers(ref)[2]
        try:
            a, b = _combine_leaf(factors, combination_type, opts,
                                 None if key is None else jax.random.fold_in(key, i),
                                 svd_rank, svd_clamp, (math.prod(I), math.prod(O)))
        except ValueError as e:
            raise ValueError(f"add_weighted_adapter: leaf {path!r}: {e}") from None
        r = a.shape[-1]
        out.append(LoraWeight(ref.w0, a.reshape((*S, *I, r)).astype(ref.a.dtype),
                              b.reshape((*S, r, *O)).astype(ref.b.dtype),
                              alpha=float(r), rslora=False, in_axes=ref.in_axes))
    return jax.tree_util.tree_unflatten(treedef, out)


def safe_merge(params):
    """:func:`~lora_jax.lora.merge`, refusing NaN/Inf in any merged weight (PEFT's
    ``merge_and_unload(safe_merge=True)``): a ``ValueError`` naming the first such leaf
    and element. Leaves that were plain arrays are passed through unchecked, as PEFT
    checks only the weights it merges. Reads values, so call it outside ``jit``."""
    checks.tree("safe_merge", "params", params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_implicit)
    out = []
    for kp, x in flat:
        if is_implicit(x):
            x = x.materialize()
            if isinstance(x, jax.core.Tracer):
                raise ValueError("safe_merge: params are traced (inside jit/grad); the check "
                                 "reads values. Call safe_merge outside jit, or merge() inside.")
            checks.finite_array("safe_merge", path_str(kp), x,
                                "the adapter is broken (diverged training?); nothing merged.")
        out.append(x)
    return jax.tree_util.tree_unflatten(treedef, out)
