"""Combining adapters into one: PEFT's ``add_weighted_adapter`` (cat, svd, linear)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core import checks
from lora_jax.lora import LoraWeight
from lora_jax.variants.multi import adapter_names, is_multi, unstack_adapter
from lora_jax.variants.stack import check_adapters, flat_adapters


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


def _check_args(adapters, weights, combination_type, svd_rank, svd_clamp, names) -> list:
    """The weights as floats, after checking every argument (a NaN weight would silently
    turn the combined adapter into NaN)."""
    what = "add_weighted_adapter"
    checks.tree(what, "adapters", adapters)
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"{what}: weights must be a list of numbers, one per adapter, got "
                        f"{type(weights).__name__}.")
    ws = [checks.number(what, f"weights[{i}]", w, positive=False) for i, w in enumerate(weights)]
    if combination_type not in ("cat", "svd", "linear"):
        raise ValueError(f"{what}: combination_type {combination_type!r} is not supported; use "
                         "'cat' (exact), 'svd' (truncated) or 'linear'.")
    if svd_rank is not None:
        checks.positive_int(what, "svd_rank", svd_rank)
    if svd_clamp is not None and not 0 < checks.number(what, "svd_clamp", svd_clamp) <= 1:
        raise ValueError(f"{what}: svd_clamp must be a quantile in (0, 1], got {svd_clamp!r}.")
    if names is not None and (isinstance(names, (str, bytes)) or not all(
            isinstance(n, str) for n in names)):
        raise TypeError(f"{what}: names must be a list of adapter names, got {names!r}.")
    return ws


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
    ws = _check_args(adapters, weights, combination_type, svd_rank, svd_clamp, names)
    ad = _as_mapping(adapters, names)
    if len(ws) != len(ad):
        raise ValueError(f"add_weighted_adapter: {len(ws)} weights for {len(ad)} adapters "
                         f"{list(ad)}.")
    if not ad:
        raise ValueError("add_weighted_adapter: no adapters given.")
    if len(ad) == 1:
        combination_type = "linear"       # as PEFT: one adapter merges linearly
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
                              alpha=float(r), rslora=False, in_axes=ref.in_axes))
    return jax.tree_util.tree_unflatten(treedef, out)
