"""MultiLoraWeight's rules: per-row adapters in a matmul, an embedding lookup, a convolution.

Each rule computes the base once for the whole batch (``w0`` frozen by ``lora``)
and adds, for every batch row, the low-rank part of that row's adapter (``ids[row]``;
-1 = none), gathered from the stacked A/B; rows of a DoRA adapter are then scaled by
its ``m / ||w0 + s*a@b||`` per output feature. See :mod:`lora_jax.variants.multi` for
which axis holds the batch rows in each use.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import lorafy, lora
    >>> from lora_jax.variants import stack_adapters, with_adapter_ids
    >>> emb = {"embedding": jnp.ones((11, 5))}
    >>> ad = {n: lorafy(emb, rank=2, targets="embedding") for n in ("fr", "de")}
    >>> mp = with_adapter_ids(stack_adapters(ad), ["de", None])
    >>> lora(lambda p, t: jnp.take(p["embedding"], t, axis=0))(mp, jnp.ones((2, 3), int)).shape
    (2, 3, 5)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core import compat, dense, is_implicit, register
from lora_jax.variants.dora import gram_norm
from lora_jax.variants.multi import MultiLoraWeight


def _drop(ctx, x):
    # lora(fn, dropout=p) drops out the adapter input only, as the single-adapter rules do.
    return ctx.drop(x) if hasattr(ctx, "drop") else x


def _check(w: MultiLoraWeight, rows: int, what: str):
    if w.ids is None:
        raise ValueError("MultiLoraWeight used without adapter ids: call "
                         "with_adapter_ids(params, ids) (one id per batch row, -1 = base).")
    if w.stack_ndim:
        raise TypeError(
            f"MultiLoraWeight of shape {w.shape} with {w.stack_ndim} stacked axes met {what} "
            "directly; apply it under lax.scan/nn.scan over the stacked axes (which slices it "
            "per layer), or unstack the layers first.")
    if w.ids.ndim != 1 or rows != w.ids.shape[0]:
        raise ValueError(
            f"MultiLoraWeight: {w.ids.shape[-1]} adapter ids for {rows} batch rows in a "
            f"{what}; the batch-row axis must have one id per row.")


def _rows(w: MultiLoraWeight, dtype):
    """``(idx [B], row_scale [B], valid [B])``: each row's adapter (0 for base rows, whose
    scale is 0, so they get exactly the base)."""
    valid = (w.ids >= 0) & (w.ids < w.num_adapters)
    idx = jnp.where(valid, w.ids, 0)
    scale = jnp.where(valid, jnp.asarray(w.scales, dtype)[idx], jnp.zeros((), dtype))
    return idx, scale, valid


def _row_factor(w: MultiLoraWeight, idx, valid):
    """[B, O_flat] float32: each row's DoRA factor ``m / ||V||`` (1 for LoRA and base rows),
    or None when no adapter is DoRA on this leaf."""
    doras = getattr(w, "doras", ())
    if not any(doras):
        return None
    n, r = w.num_adapters, w.a.shape[-1]
    n_in = math.prod(w.shape[:w.in_ndim])
    w0 = dense(w.w0).reshape(1, n_in, -1)
    norm = gram_norm(w0, w.a.reshape(n, n_in, r), w.b.reshape(n, r, -1),
                     jnp.asarray(w.scales, jnp.float32)[:, None])             # [N, O]
    fac = w.m.reshape(n, -1).astype(jnp.float32) / lax.stop_gradient(norm)
    use = jnp.asarray(doras)[idx] & valid
    return jnp.where(use[:, None], fac[idx], jnp.ones((), jnp.float32))


def _finish(base, d, f, row_axis: int, feat_axes: tuple[int, ...]):
    """``(base + d)`` scaled by the per-row factor ``f`` [B, O_flat] placed on the output's
    ``row_axis`` and feature axes."""
    out = base + d.astype(base.dtype)
    if f is None:
        return out
    shape = [1] * out.ndim
    shape[row_axis] = out.shape[row_axis]
    for ax in feat_axes:
        shape[ax] = out.shape[ax]
    order = sorted((row_axis, *feat_axes))
    f = f.reshape([out.shape[ax] for ax in (row_axis, *feat_axes)])
    f = jnp.moveaxis(f, range(f.ndim), [order.index(ax) for ax in (row_axis, *feat_axes)])
    return out * f.reshape(shape).astype(out.dtype)


@register("dot_general", MultiLoraWeight)
def _multi_dot_rule(eqn, invals, ctx):
    lhs, w = invals
    if not isinstance(w, MultiLoraWeight) or is_implicit(lhs):
        raise TypeError(
            "MultiLoraWeight: only x @ W (the weight as the right operand of dot_general) is "
            "supported; pick one adapter with unstack_adapter(params, name) for other uses.")
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    _check(w, lhs.shape[0], "dot_general")
    if lb or rb:
        raise TypeError("MultiLoraWeight: dot_general with batch dimensions is not supported; "
                        "the batch rows must be a free axis 0 of the activation.")
    if set(rc) != set(range(w.in_ndim)):
        raise TypeError(
            f"MultiLoraWeight: dot_general contracts weight axes {tuple(rc)}, not its input axes "
            f"{tuple(range(w.in_ndim))} (a tied-embedding 'attend' or transposed use is not "
            "supported).")
    if 0 in lc:
        raise TypeError("MultiLoraWeight: axis 0 of the activation must be the batch-row axis, "
                        "but dot_general contracts it.")
    precision = eqn.params.get("precision")
    base = compat.bind(eqn, lhs, dense(w.w0))
    idx, row_scale, valid = _rows(w, lhs.dtype)
    a_g = jnp.take(w.a, idx, axis=0).astype(lhs.dtype)                  # [B, *I, r]
    b_g = jnp.take(w.b, idx, axis=0).astype(lhs.dtype)                  # [B, r, *O]
    t = lax.dot_general(_drop(ctx, lhs), a_g, ((tuple(lc), tuple(j + 1 for j in rc)),
                                               ((0,), (0,))), precision=precision)
    t = t * row_scale.reshape((-1, *(1,) * (t.ndim - 1)))               # [B, x_rest, r]
    d = lax.dot_general(t, b_g, (((t.ndim - 1,), (1,)), ((0,), (0,))), precision=precision,
                        preferred_element_type=eqn.params.get("preferred_element_type"))
    n_out = len(w.shape) - w.in_ndim
    return _finish(base, d, _row_factor(w, idx, valid), 0,
                   tuple(range(base.ndim - n_out, base.ndim)))


@register("gather", MultiLoraWeight)
def _multi_gather_rule(eqn, invals, ctx):
    w, tok = invals
    if not isinstance(w, MultiLoraWeight) or is_implicit(tok) or len(w.shape) != 2:
        return NotImplemented
    p = eqn.params
    dn = p["dimension_numbers"]
    # An embedding lookup: whole rows of the [V, D] table, token ids [B, ..., 1].
    if (tuple(dn.collapsed_slice_dims) != (0,) or tuple(dn.start_index_map) != (0,)
            or tuple(p["slice_sizes"]) != (1, w.shape[1]) or tok.ndim < 2
            or tuple(getattr(dn, "operand_batching_dims", ())) != () or dn.offset_dims[0] == 0):
        return NotImplemented
    _check(w, tok.shape[0], "gather (embedding lookup)")
    base = compat.bind(eqn, dense(w.w0), tok)
    dtype = base.dtype
    idx, row_scale, valid = _rows(w, dtype)
    rows = jnp.broadcast_to(idx.astype(tok.dtype).reshape((-1, *(1,) * (tok.ndim - 1))),
                            tok.shape)
    # (adapter, token) pairs index the stacked A [N, V, r]; the eqn's mode and fill value
    # treat an out-of-range token as the base lookup does.
    t = lax.gather(w.a.astype(dtype), jnp.concatenate([rows, tok], axis=-1),
                   lax.GatherDimensionNumbers(offset_dims=(tok.ndim - 1,),
                                              collapsed_slice_dims=(0, 1),
                                              start_index_map=(0, 1)),
                   (1, 1, w.a.shape[-1]), mode=p["mode"], fill_value=p.get("fill_value"))
    t = t * row_scale.reshape((-1, *(1,) * (t.ndim - 1)))               # [B, ..., r]
    d = jnp.einsum("b...r,bro->b...o", t, jnp.take(w.b, idx, axis=0).astype(dtype))
    d = jnp.moveaxis(d, -1, dn.offset_dims[0])
    return _finish(base, d, _row_factor(w, idx, valid), 0, (dn.offset_dims[0],))


@register("conv_general_dilated", MultiLoraWeight)
def _multi_conv_rule(eqn, invals, ctx):
    x, w = invals
    p = eqn.params
    dn = p["dimension_numbers"]
    nd = len(w.shape)
    if (not isinstance(w, MultiLoraWeight) or is_implicit(x) or w.in_ndim != nd - 1
            or dn.rhs_spec[0] != nd - 1 or p["batch_group_count"] != 1):
        return NotImplemented
    lb, ob, of = dn.lhs_spec[0], dn.out_spec[0], dn.out_spec[1]
    _check(w, x.shape[lb], "convolution")
    base = compat.bind(eqn, x, dense(w.w0))
    idx, row_scale, valid = _rows(w, x.dtype)
    # A [*window, in, r] has W's layout with r for the output features: one conv per row,
    # run once per feature group (as the single-adapter rule does).
    groups, r = p["feature_group_count"], w.a.shape[-1]

    def one(xi, ai):
        y = lax.conv_general_dilated(
            jnp.expand_dims(xi, lb), jnp.tile(ai, (1,) * (ai.ndim - 1) + (groups,)),
            p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"], dn,
            feature_group_count=groups, precision=p.get("precision"))
        return jnp.squeeze(y, ob)
    t = jax.vmap(one, (lb, 0), ob)(_drop(ctx, x), jnp.take(w.a, idx, axis=0).astype(x.dtype))
    t = t * row_scale.reshape([-1 if i == ob else 1 for i in range(t.ndim)])
    # B per pixel (the single-adapter rule's 1x1 conv) with each row's B: group g's r
    # features to g's outputs.
    t = jnp.moveaxis(t, (ob, of), (0, -1))                              # [B, ..., G*r]
    t = t.reshape(*t.shape[:-1], groups, r)
    b = jnp.take(w.b, idx, axis=0).astype(x.dtype)                      # [B, r, O]
    d = jnp.einsum("b...gr,brgo->b...go", t, b.reshape(*b.shape[:2], groups, -1),
                   preferred_element_type=p.get("preferred_element_type"))
    d = jnp.moveaxis(d.reshape(*d.shape[:-2], -1), (0, -1), (ob, of))
    return _finish(base, d, _row_factor(w, idx, valid), ob, (of,))
