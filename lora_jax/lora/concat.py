"""``concatenate`` and ``pad`` of LoRA weights: a weight assembled at call time stays factored.

``jnp.concatenate([wq, wk, wv], axis=-1)`` (one matmul for q, k and v) is a LoRA weight
whose ΔW is the blocks' ΔWs side by side:

* along an output axis: A = [A_q | A_k | A_v] (ranks side by side), B block-diagonal;
* along an input axis (``concat([x, h]) @ concat([W_x, W_h])``): A block-diagonal,
  B = [B_x; B_h] (ranks stacked);
* along a stacked axis: every leaf concatenated, ranks padded with zeros to the largest.

A plain array among the blocks (a weight left out of the targets) adds no rank. Each
block's scale is folded into its B, so the result has scale 1 (``alpha`` = its rank); the
zero blocks are built, not trained, so every A and B gets exactly its own gradient.
With a quantized ``w0`` the fused base is dequantized, as the model's own concatenation
of the dense weights would be.

``jnp.pad(W, ...)`` (heads or a vocabulary padded to a multiple) pads ``w0`` with the given
value and the factors with zeros along the same axes (A's rows for an input axis, B's
columns for an output axis, both for a stacked one), so ΔW is zero on the padding.

Example:
    >>> import dataclasses, jax, jax.numpy as jnp, lora_jax as lj
    >>> k = jax.random.split(jax.random.key(0), 3)
    >>> p = {"q": jax.random.normal(k[0], (5, 7)), "v": jax.random.normal(k[1], (5, 3))}
    >>> lp = lj.lorafy(p, rank=2, targets=("q", "v"), key=k[2])
    >>> lp = {name: dataclasses.replace(n, b=jnp.ones_like(n.b)) for name, n in lp.items()}
    >>> f = lambda p, x: x @ jnp.concatenate([p["q"], p["v"]], axis=1)
    >>> x = jnp.ones((4, 5))
    >>> bool(jnp.allclose(lj.lora(f, strict=True)(lp, x), f(lj.merge(lp), x), atol=1e-5))
    True
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lora_jax.core import compat, dense, is_implicit, register
from lora_jax.lora.weight import LoraWeight


def _placed(factor, axis: int, lo: int, total: int):
    """``factor`` inside zeros of length ``total`` along ``axis``, starting at ``lo``."""
    pad = [(0, 0, 0)] * factor.ndim
    pad[axis] = (lo, total - lo - factor.shape[axis], 0)
    return lax.pad(factor, jnp.zeros((), factor.dtype), pad)


def _zeros(like, shape_at: dict):
    shape = list(like.shape)
    for axis, size in shape_at.items():
        shape[axis] = size
    return jnp.zeros(shape, like.dtype)


@register("concatenate", LoraWeight)
def _concat_rule(eqn, invals, ctx):
    nodes = [x for x in invals if is_implicit(x)]
    if any(type(x) is not LoraWeight for x in nodes):
        return NotImplemented
    ref = nodes[0]
    s, ins, d = ref.stack_ndim, ref.in_axes, eqn.params["dimension"]
    if any(n.stack_ndim != s or n.in_axes != ins for n in nodes):
        return ctx.decline("is concatenated with a weight of another layout.")
    if d < s and len(nodes) != len(invals):
        return ctx.decline("is concatenated along its stacked axis with a plain array.")
    a_dt, b_dt = ref.a.dtype, ref.b.dtype
    w0 = compat.bind(eqn, *[dense(x.w0) if is_implicit(x) else x for x in invals])
    ranks = [n.rank for n in nodes]
    # (A_i, s_i·B_i) per block; None for a plain array
    parts = [(x.a.astype(a_dt), (x.b * x.scale).astype(b_dt)) if is_implicit(x) else None
             for x in invals]
    if d < s:
        r = max(ranks)
        a = jnp.concatenate([_placed(pa, pa.ndim - 1, 0, r) for pa, _ in parts], axis=d)
        b = jnp.concatenate([_placed(pb, s, 0, r) for _, pb in parts], axis=d)
        return LoraWeight(w0, a, b, alpha=float(r), in_axes=ins)
    r, j = sum(ranks), d - s
    on_input = j in ins
    # the axis of A (input side) or B (output side) that W's axis d becomes
    axis = s + ins.index(j) if on_input else s + 1 + ref.out_axes.index(j)
    spread, joined, lo = [], [], 0
    for x, part in zip(invals, parts):
        if part is None:
            like = ref.a if on_input else ref.b
            spread.append(_zeros(like, {axis: x.shape[d], (like.ndim - 1 if on_input else s): r}))
            continue
        pa, pb = part
        if on_input:   # A's rows of this block, in its own rank columns; B's ranks stacked
            spread.append(_placed(pa, pa.ndim - 1, lo, r))
            joined.append(pb)
        else:          # A's ranks side by side; B's columns of this block, in its own rank rows
            joined.append(pa)
            spread.append(_placed(pb, s, lo, r))
        lo += pa.shape[-1]
    spread = jnp.concatenate(spread, axis=axis)
    joined = jnp.concatenate(joined, axis=s if on_input else joined[0].ndim - 1)
    a, b = (spread, joined) if on_input else (joined, spread)
    return LoraWeight(w0, a, b, alpha=float(r), in_axes=ins)


@register("pad", LoraWeight)
def _pad_rule(eqn, invals, ctx):
    w, value = invals
    if not isinstance(w, LoraWeight) or is_implicit(value):
        return NotImplemented
    cfg, s = eqn.params["padding_config"], w.stack_ndim
    keep = (0, 0, 0)
    a_cfg = [*cfg[:s], *(cfg[s + j] for j in w.in_axes), keep]
    b_cfg = [*cfg[:s], keep, *(cfg[s + j] for j in w.out_axes)]
    a = lax.pad(w.a, jnp.zeros((), w.a.dtype), a_cfg)
    b = lax.pad(w.b, jnp.zeros((), w.b.dtype), b_cfg)
    return LoraWeight(lax.pad(dense(w.w0), value, cfg), a, b, alpha=w.alpha, rslora=w.rslora,
                      in_axes=w.in_axes)
