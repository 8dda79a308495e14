"""LoraWeight's rules: where ``W = W0 + s*A@B`` meets a primitive, use the factors.

* ``dot_general``: any contraction whose contracted weight axes are all input
  axes (``x@W``: ``x@W0 + s*(x@A)@B``) or all output axes (a tied embedding's
  ``attend``: ``x@W0ᵀ + s*(x@Bᵀ)@Aᵀ``), whatever their order and position, with
  W as either operand, stacked axes batched or free (``vmap`` with a shared input).
* ``conv_general_dilated``: A is a conv with W's window, B a 1×1 conv (PEFT's conv LoRA),
  for any kernel layout (HWIO, OIHW, ...) and feature groups (depthwise too).
* ``gather`` of rows (embedding lookup): rows of A (or Bᵀ), then the other factor.
* ``gather`` of whole matrices along stacked axes (``experts[ids]``): the same gather of
  every leaf.
* ``transpose`` / ``reshape`` / ``slice`` / ``dynamic_slice`` / ``split`` / ``rev`` (any
  axis: rows of A, columns of B) / stacked-axis ``squeeze`` / new leading axes
  (``broadcast_in_dim``) / a scalar ``mul`` or ``div`` (muP-style ``W * scale``: w0 and B
  scaled) / ``neg`` / ``name`` (``checkpoint_name``: every leaf named) / ``stop_gradient``:
  a new LoraWeight. ``concatenate`` and ``pad`` live in :mod:`lora_jax.lora.concat`.
With ``lora(fn, dropout=p)`` the dot and conv rules drop out the adapter's input
(``ctx.drop``), never the base path's.
W0 is frozen by construction: :func:`lora_jax.lora` puts it under ``stop_gradient`` on the
way in (not here: see ``transform._freeze``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax.core import compat, dense, is_implicit, register
from lora_jax.lora.factor_dot import einsum, factor_dot
from lora_jax.lora.weight import AdapterNode, LoraWeight

_LAYOUT_FIX = ("Build the adapter with lorafy(..., fn=fn, args=example_args) so its layout is "
               "read off how fn uses the weight (or pass layout=).")


_TRANSPOSED_USE = (
    "is contracted on the axes its layout calls outputs (x @ W.T), and no use from its input "
    "side (an embedding lookup, x @ W) came before: unless it is a tied embedding or weight, "
    "its layout was guessed wrong, A sits on its output side and to_peft writes it "
    "transposed. The result is exact. " + _LAYOUT_FIX)


def _base(eqn, invals, w):
    at = next(i for i, v in enumerate(invals) if v is w)

    def bind(w0, *others):
        return compat.bind(eqn, *others[:at], dense(w0), *others[at:])

    if is_implicit(w.w0):
        # A quantized w0 is dequantized again for the backward pass instead of being kept:
        # kept, it is a full-precision copy of every frozen weight (stacked, under scan).
        bind = jax.checkpoint(bind, policy=jax.checkpoint_policies.nothing_saveable)
    return bind(w.w0, *invals[:at], *invals[at + 1:])


@register("dot_general", LoraWeight)
def dot_rule(eqn, invals, ctx):
    lhs, rhs = invals
    if isinstance(rhs, LoraWeight) and not is_implicit(lhs):
        x, w, w_rhs = lhs, rhs, True
    elif isinstance(lhs, LoraWeight) and not is_implicit(rhs):
        x, w, w_rhs = rhs, lhs, False
    else:
        return NotImplemented
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    xc, wc, xb, wb = (lc, rc, lb, rb) if w_rhs else (rc, lc, rb, lb)
    s, n = w.stack_ndim, len(w.shape)
    ins = [s + j for j in w.in_axes]
    outs = [s + j for j in w.out_axes]
    if not wc or not (set(wc) <= set(ins) or set(wc) <= set(outs)):
        return ctx.decline(
            f"meets a dot_general contracting its axes {tuple(wc)}, but its layout has stacked "
            f"axes {tuple(range(s))}, input axes {tuple(ins)} and output axes {tuple(outs)}: the "
            f"adapter's layout does not match how fn uses the weight. {_LAYOUT_FIX}")
    letters = iter(string.ascii_letters)
    wl = [next(letters) for _ in range(n)]
    r = next(letters)
    xl = [None] * x.ndim
    for q, p in (*zip(xc, wc), *zip(xb, wb)):
        xl[q] = wl[p]
    xl = [lab or next(letters) for lab in xl]
    x_free = [xl[q] for q in range(x.ndim) if q not in (*xc, *xb)]
    w_free = [wl[p] for p in range(n) if p not in (*wc, *wb)]
    batch = [wl[p] for p in wb]
    out = [*batch, *x_free, *w_free] if w_rhs else [*batch, *w_free, *x_free]
    a_l = [*wl[:s], *(wl[p] for p in ins), r]
    b_l = [*wl[:s], r, *(wl[p] for p in outs)]
    (first, fl), (second, sl) = ((w.a, a_l), (w.b, b_l))
    if set(wc) <= set(outs) and not set(wc) <= set(ins):   # a tied embedding's attend
        (first, fl), (second, sl) = (second, sl), (first, fl)
        if ctx.name(w) not in ctx.read_in:
            ctx.warn(w, _TRANSPOSED_USE)
    else:
        ctx.read_in.add(ctx.name(w))
    x_ad = ctx.drop(x)                                      # lora_dropout: adapter input only
    precision = eqn.params.get("precision")
    contracted = {wl[p] for p in wc}
    t_l = [lab for lab in xl if lab not in contracted]
    t_l += [lab for lab in fl if lab not in xl]
    t = einsum(x_ad, xl, first.astype(x.dtype), fl, t_l, precision=precision)
    t = t * jnp.asarray(w.scale, t.dtype)
    delta = factor_dot(t, t_l, second.astype(x.dtype), sl, out, precision=precision,
                       preferred_element_type=eqn.params.get("preferred_element_type"),
                       vjp_only=ctx.vjp_only)
    base = _base(eqn, invals, w)
    return base + delta.astype(base.dtype)


def unit_axes_moved(w, in_axes):
    """``w`` with the layout ``in_axes``, when the two differ only in size-1 axes (a reshape
    cannot tell on which side it inserts one): exact, as a size-1 axis fits in A or in B.
    None when a larger axis differs."""
    s, shape = w.stack_ndim, w.shape[w.stack_ndim:]
    have, want = set(w.in_axes), set(in_axes)
    if have == want or any(shape[j] != 1 for j in have ^ want):
        return None
    ins = tuple(j for j in w.in_axes if j in want) + tuple(sorted(want - have))
    outs = [j for j in range(len(shape)) if j not in want]
    # only size-1 axes come and go, and the others keep their order: reshapes are exact
    a = w.a.reshape(*w.a.shape[:s], *(shape[j] for j in ins), w.rank)
    b = w.b.reshape(*w.b.shape[:s + 1], *(shape[j] for j in outs))
    return dataclasses.replace(w, a=a, b=b, in_axes=ins)


@register("conv_general_dilated", LoraWeight)
def _conv_rule(eqn, invals, ctx):
    x, w = invals
    if not isinstance(w, LoraWeight) or is_implicit(x):
        return NotImplemented
    p = eqn.params
    dn = p["dimension_numbers"]
    nd, out_ax = len(w.shape), dn.rhs_spec[0]
    if not w.stack_ndim:
        w = unit_axes_moved(w, [j for j in range(nd) if j != out_ax]) or w
    if w.stack_ndim or set(w.in_axes) != set(range(nd)) - {out_ax}:
        return ctx.decline(
            f"meets a convolution whose output-feature axis is {out_ax}, but its layout has "
            f"input axes {w.in_axes}. {_LAYOUT_FIX}")
    if p["batch_group_count"] != 1:
        return ctx.decline("meets a convolution with batch_group_count > 1 (a grouped "
                           "convolution's weight gradient), which has no LoRA rule.")
    a_axis = {ax: i for i, ax in enumerate(w.in_axes)}          # W axis -> A axis
    a_spec = (nd - 1, *(a_axis[ax] for ax in dn.rhs_spec[1:]))
    common = dict(precision=p.get("precision"))
    # With G feature groups, W [*K, I/G, O] is one matrix that every group's input meets, so
    # A runs once per group (A tiled to G*r outputs, grouped as W is) and B maps group g's r
    # features to g's outputs: a grouped 1x1 conv. G = 1 is PEFT's conv LoRA.
    groups = p["feature_group_count"]
    a = jnp.tile(w.a.astype(x.dtype), (1,) * (nd - 1) + (groups,))      # [*I, G*r]
    t = lax.conv_general_dilated(
        ctx.drop(x), a, p["window_strides"], p["padding"], p["lhs_dilation"],
        p["rhs_dilation"], lax.ConvDimensionNumbers(dn.lhs_spec, a_spec, dn.out_spec),
        feature_group_count=groups, **common)
    t = t * jnp.asarray(w.scale, t.dtype)
    # B is a 1x1 conv from r to out features in the kernel layout of the eqn.
    kshape = [1] * nd
    kshape[dn.rhs_spec[0]], kshape[dn.rhs_spec[1]] = w.b.shape[1], w.rank
    bk = w.b.astype(x.dtype)
    bk = (bk if dn.rhs_spec[1] < dn.rhs_spec[0] else bk.T).reshape(kshape)
    nsp = nd - 2
    d = lax.conv_general_dilated(
        t, bk, (1,) * nsp, [(0, 0)] * nsp, (1,) * nsp, (1,) * nsp,
        lax.ConvDimensionNumbers(dn.out_spec, dn.rhs_spec, dn.out_spec),
        feature_group_count=groups, preferred_element_type=p.get("preferred_element_type"),
        **common)
    base = _base(eqn, (x, w), w)
    return base + d.astype(base.dtype)


def gathered_axes(dn, sizes, shape) -> tuple:
    """The operand axes a gather indexes (not those it takes whole, from a start of 0)."""
    return tuple(a for a in dn.start_index_map if sizes[a] != shape[a]) \
        or tuple(dn.start_index_map)


def whole_slices(eqn, shape) -> bool:
    """Whether a gather takes single entries of the axes it indexes and all of the others."""
    dn, sizes = eqn.params["dimension_numbers"], eqn.params["slice_sizes"]
    taken = gathered_axes(dn, sizes, shape)
    return (not tuple(getattr(dn, "operand_batching_dims", ()))
            and all(z == (1 if a in taken else shape[a]) for a, z in enumerate(sizes)))


def is_row_lookup(eqn, w) -> bool:
    """Whether a gather takes whole rows of the 2-D ``w`` along its axis 0 (an embedding
    lookup, ``table[ids]`` or, vmapped, ``table[i]``): each looked-up row holds every
    feature."""
    dn = eqn.params["dimension_numbers"]
    return (len(w.shape) == 2 and whole_slices(eqn, w.shape)
            and gathered_axes(dn, eqn.params["slice_sizes"], w.shape) == (0,))


@register("gather", LoraWeight)
def _gather_rule(eqn, invals, ctx):
    w, idx = invals
    if not isinstance(w, LoraWeight) or is_implicit(idx):
        return NotImplemented
    if w.stack_ndim:
        return _select_rule(eqn, w, idx, ctx)
    if not is_row_lookup(eqn, w):
        return NotImplemented
    p = eqn.params
    feat = p["dimension_numbers"].offset_dims[-1]        # the output axis of w's axis 1
    # Rows along an input axis (Flax Embed) come from A; along an output axis from Bᵀ.
    rows_of, other = (w.a, w.b) if w.in_axes == (0,) else (w.b.T, w.a.T)
    ctx.read_in.add(ctx.name(w))
    rows = eqn.primitive.bind(rows_of, idx, **dict(p, slice_sizes=(1, w.rank)))  # r at offset
    rows = jnp.moveaxis(rows, feat, -1) * jnp.asarray(w.scale, rows.dtype)
    d = jnp.moveaxis(rows @ other.astype(rows.dtype), -1, feat)
    base = _base(eqn, invals, w)
    return base + d.astype(base.dtype)


def _select_rule(eqn, w, idx, ctx):
    """``w[ids]`` over stacked axes only (a mixture of experts picking each token's matrix):
    the same gather of every leaf, a node whose leading stacked axes are the ids' axes."""
    dn = eqn.params["dimension_numbers"]
    n_out = len(eqn.outvars[0].aval.shape)
    n_batch = n_out - len(dn.offset_dims)
    taken = gathered_axes(dn, eqn.params["slice_sizes"], w.shape)
    if not (whole_slices(eqn, w.shape) and all(a < w.stack_ndim for a in taken)
            and tuple(dn.offset_dims) == tuple(range(n_batch, n_out))):
        return ctx.decline("is gathered along its non-stacked axes, or with the looked-up "
                           "axes after the others.")

    def pick(leaf):
        offsets = tuple(range(n_batch, n_batch + leaf.ndim - len(dn.collapsed_slice_dims)))
        return lax.gather(leaf, idx, dn._replace(offset_dims=offsets),
                          tuple(1 if a in taken else leaf.shape[a] for a in range(leaf.ndim)),
                          mode=eqn.params["mode"], fill_value=eqn.params.get("fill_value"),
                          indices_are_sorted=eqn.params["indices_are_sorted"],
                          unique_indices=eqn.params["unique_indices"])
    return jax.tree.map(pick, w)


@register("transpose", LoraWeight)
def transpose_rule(eqn, invals, ctx):
    (w,) = invals
    perm = tuple(eqn.params["permutation"])
    s = w.stack_ndim
    if perm[:s] != tuple(range(s)):
        return ctx.decline("is transposed across its stacked-layer axes.")
    rel = [q - s for q in perm[s:]]                   # new relative position -> old
    new_pos = {old: new for new, old in enumerate(rel)}
    in_axes = tuple(new_pos[j] for j in w.in_axes)
    old_out = list(w.out_axes)
    new_out_order = sorted(old_out, key=lambda j: new_pos[j])
    b = lax.transpose(w.b, (*range(s + 1), *(s + 1 + old_out.index(j) for j in new_out_order)))
    return LoraWeight(lax.transpose(dense(w.w0), perm), w.a, b, alpha=w.alpha, rslora=w.rslora,
                      in_axes=in_axes)


@register("reshape", LoraWeight)
def _reshape_rule(eqn, invals, ctx):
    w = invals[0]
    if len(invals) != 1 or eqn.params.get("dimensions"):
        return NotImplemented
    new = tuple(eqn.params["new_sizes"])
    s, shape = w.stack_ndim, w.shape
    if s and new[:s] != shape[:s] and math.prod(shape[:s]) == 1:
        # a stack of one layer reshaped away ([1, D, F] used as [D, F]): drop it everywhere
        w = jax.tree.map(lambda leaf: leaf.reshape(leaf.shape[s:]), w)
        s, shape = 0, w.shape
    ins, outs = list(w.in_axes), list(w.out_axes)
    n = len(shape) - s
    in_first = ins == list(range(len(ins)))
    if not (in_first or ins == list(range(n - len(ins), n))) or new[:s] != shape[:s]:
        return ctx.decline("is reshaped in a way that mixes its input and output axes.")
    head = math.prod(shape[s + j] for j in (ins if in_first else outs))
    rest = new[s:]
    cut = next((k for k in range(1, len(rest)) if math.prod(rest[:k]) == head), None)
    if cut is None:
        return ctx.decline("is reshaped in a way that mixes its input and output axes.")
    i_shape, o_shape = (rest[:cut], rest[cut:]) if in_first else (rest[cut:], rest[:cut])
    a = w.a.reshape((*shape[:s], *i_shape, w.rank))
    b = w.b.reshape((*shape[:s], w.rank, *o_shape))
    in_axes = tuple(range(cut)) if in_first else tuple(range(cut, len(rest)))
    return LoraWeight(dense(w.w0).reshape(new), a, b, alpha=w.alpha, rslora=w.rslora,
                      in_axes=in_axes)


def _cut(w, cuts: dict):
    """``w`` with ``cuts[p](leaf, axis)`` applied along each of its axes ``p``. A stacked axis
    is cut in every leaf (a quantized ``w0`` stays quantized); an input axis in ``w0`` and
    A's rows, an output axis in ``w0`` and B's columns: exact, the factors stay apart."""
    s = w.stack_ndim
    stacked = {p: f for p, f in cuts.items() if p < s}
    if stacked:
        def cut_leaf(leaf):
            for p, f in stacked.items():
                leaf = f(leaf, p)
            return leaf
        w = jax.tree.map(cut_leaf, w)
    rest = {p: f for p, f in cuts.items() if p >= s}
    if not rest:
        return w
    w0, a, b = dense(w.w0), w.a, w.b
    for p, f in rest.items():
        w0, j = f(w0, p), p - s
        if j in w.in_axes:
            a = f(a, s + w.in_axes.index(j))
        else:
            b = f(b, s + 1 + w.out_axes.index(j))
    return LoraWeight(w0, a, b, alpha=w.alpha, rslora=w.rslora, in_axes=w.in_axes)


@register("slice", LoraWeight)
def _slice_rule(eqn, invals, ctx):
    (w,) = invals
    p = eqn.params
    strides = p.get("strides") or (1,) * len(w.shape)
    return _cut(w, {ax: functools.partial(_slice_axis, lo, hi, st)
                    for ax, (lo, hi, st, d) in enumerate(zip(p["start_indices"], p["limit_indices"],
                                                             strides, w.shape))
                    if (lo, hi, st) != (0, d, 1)})


def _slice_axis(lo, hi, stride, leaf, axis):
    return lax.slice_in_dim(leaf, lo, hi, stride, axis)


@register("dynamic_slice", LoraWeight)
def _dynamic_slice_rule(eqn, invals, ctx):
    w, *starts = invals
    if any(is_implicit(i) for i in starts):
        return NotImplemented
    sizes = eqn.params["slice_sizes"]
    return _cut(w, {ax: functools.partial(_dynamic_slice_axis, start, size)
                    for ax, (start, size, d) in enumerate(zip(starts, sizes, w.shape))
                    if size != d})


def _dynamic_slice_axis(start, size, leaf, axis):
    return lax.dynamic_slice_in_dim(leaf, start, size, axis)


@register("rev", LoraWeight)
def _rev_rule(eqn, invals, ctx):
    """A flipped axis (``conv_transpose(transpose_kernel=True)``'s spatial flip) is flipped
    in A (input axis), B (output axis) or every leaf (stacked)."""
    (w,) = invals
    return _cut(w, {ax: lambda leaf, axis: lax.rev(leaf, (axis,))
                    for ax in eqn.params["dimensions"]})


@register("split", LoraWeight)
def _split_rule(eqn, invals, ctx):
    (w,) = invals
    axis, ends = eqn.params["axis"], np.cumsum(eqn.params["sizes"])
    return [_cut(w, {axis: functools.partial(_slice_axis, int(hi - z), int(hi), 1)})
            for z, hi in zip(eqn.params["sizes"], ends)]


@register("squeeze", LoraWeight)
def _squeeze_rule(eqn, invals, ctx):
    (w,) = invals
    dims = tuple(eqn.params["dimensions"])
    if not all(ax < w.stack_ndim for ax in dims):
        return ctx.decline("is squeezed along a non-stacked axis.")
    return jax.tree.map(lambda leaf: lax.squeeze(leaf, dims), w)


@register("broadcast_in_dim", LoraWeight)
def _broadcast_rule(eqn, invals, ctx):
    """``w[None]``, ``jnp.broadcast_to(w, (k, *w.shape))``: new leading stacked axes."""
    w = invals[0]
    shape, dims = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    k = len(shape) - len(w.shape)
    if len(invals) != 1 or dims != tuple(range(k, len(shape))) or shape[k:] != w.shape:
        return ctx.decline("is broadcast along axes other than new leading ones.")
    return jax.tree.map(lambda leaf: lax.broadcast(leaf, shape[:k]), w)


def scalar_operand(eqn, invals, w):
    """The scalar that ``w * c``, ``c * w`` or ``w / c`` scales node ``w`` by, else None."""
    if eqn.primitive.name == "div" and invals[0] is not w:
        return None
    other = [x for x in invals if x is not w]
    if len(other) != 1 or is_implicit(other[0]) or np.ndim(other[0]) != 0:
        return None
    return other[0]


def _scalar_rule(eqn, invals, ctx):
    """``W * c`` is a LoRA weight over ``c*w0`` with ``c*B`` (a quantized w0 stays quantized,
    its scales scaled): muP-style reparametrization (haliax's Linear) keeps the factors."""
    w = next(x for x in invals if isinstance(x, LoraWeight))
    c = scalar_operand(eqn, invals, w)
    if c is None:
        return ctx.decline(f"meets '{eqn.primitive.name}' with an array that is not a scalar.")
    if is_implicit(w.w0) and not hasattr(w.w0, "scaled"):
        return NotImplemented
    inv = eqn.primitive.name == "div"
    if is_implicit(w.w0):
        w0 = w.w0.scaled(1.0 / jnp.asarray(c, jnp.float32) if inv else c)
    else:
        w0 = compat.bind(eqn, *[w.w0 if x is w else x for x in invals])
    cb = jnp.asarray(c, w.b.dtype)
    return dataclasses.replace(w, w0=w0, b=w.b / cb if inv else w.b * cb)


@register("neg", LoraWeight)
def _neg_rule(eqn, invals, ctx):
    """``-W``: w0 and B negated (a quantized w0 through its scales)."""
    (w,) = invals
    if is_implicit(w.w0) and not hasattr(w.w0, "scaled"):
        return NotImplemented
    w0 = w.w0.scaled(-1.0) if is_implicit(w.w0) else -w.w0
    return dataclasses.replace(w, w0=w0, b=-w.b)


# Any adapter node (LoRA, DoRA, many adapters): ``stop_gradient(W)`` stops every leaf's
# gradient, A and B included, as the user's code says of the weight; ``checkpoint_name(W, n)``
# (a remat policy's handle on a tensor) names every leaf.
@register("stop_gradient", AdapterNode)
@register("name", AdapterNode)
def _every_leaf_rule(eqn, invals, ctx):
    (w,) = invals
    return jax.tree.map(lambda leaf: compat.bind(eqn, leaf), w)


for _prim in ("mul", "div"):
    register(_prim, LoraWeight, _scalar_rule)
