"""DoRA: weight-decomposed LoRA (Liu et al. 2024), as PEFT's ``use_dora=True``::

    W' = m * V / stop_gradient(||V||),   V = w0 + s * a @ b

with the norm taken per output feature over the input axes I (PEFT: ``weight [out, in]``,
``norm(dim=1)``) and detached, as PEFT does (DoRA paper, sec. 4.3). Under ``lora(fn)``
the primitive runs on the factors and its output is scaled per output feature by
``m / ||V||``: ``x @ W'`` is ``(x@w0 + s*(x@a)@b) * m / ||V||``; a convolution is the
LoRA conv (A with W's window, then B as a 1x1 conv) times the factor per output
channel (PEFT's ``DoraConv2dLayer``); an embedding lookup (a gather of rows) is the
LoRA lookup times the factor per embedding feature (PEFT's ``DoraEmbeddingLayer``:
its magnitude has one entry per embedding feature, the norm runs over the vocabulary).

The norm is taken without forming ``V`` or ``s*a@b``: ``||V||^2 = ||w0||^2 +
2s<w0, a@b> + s^2 ||a@b||^2`` per column, the last two through ``a^T w0`` [r, O] and
``a^T a`` [r, r] (:func:`gram_norm`). Only a quantized ``w0`` is formed (dequantized,
inside jit) to take its part of the norm. ``m`` starts as ``||w0 + s*a@b||`` (=
``||w0||`` with B = 0), so a fresh DoRA model equals the base.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import lorafy
    >>> p = to_dora(lorafy({"k": jnp.arange(35.0).reshape(5, 7)}, rank=2, targets="k"))
    >>> p["k"].m.shape, bool(jnp.allclose(p["k"].materialize(), p["k"].w0))
    ((7,), True)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core import checks, compat, dense, is_implicit, node, path_str, register, static
from lora_jax.lora import (
    AdapterNode,
    LoraWeight,
    check_node,
    dot_rule,
    factor_problem,
    is_row_lookup,
    looks_like_factors,
    lora_scale,
    lorafy,
    scalar_operand,
    transpose_rule,
)

# ----------------------------------------------------------------------------- DoRA node

@node
@dataclasses.dataclass(frozen=True)
class DoraWeight(AdapterNode):
    """Stands for ``m * V / stop_gradient(||V||_col)``, ``V = w0 + scale * a @ b``.

    Shapes (as :class:`LoraWeight`, any axis order of ``w0``, plus the magnitude)::

        a: [*S, *I, r]   b: [*S, r, *O]   m: [*S, *O]

    ``||V||_col`` is the L2 norm over the input axes I for each output feature (and
    each stacked layer). ``a``, ``b`` and ``m`` train; ``w0`` is frozen.
    """

    w0: Any
    a: Any
    b: Any
    m: Any
    alpha: float = static(8.0)
    rslora: bool = static(False)
    in_axes: tuple[int, ...] = static((0,))

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b", "m")

    def __post_init__(self):
        # Only a user's construction (concrete arrays) is checked; see looks_like_factors.
        if looks_like_factors(self.w0, self.a, self.b):
            check_node("DoraWeight", self.w0, self.a, self.b, self.alpha, self.rslora,
                       self.in_axes)
            problem = _magnitude_problem(self.w0, self.a, self.m, self.in_axes)
            if problem:
                raise ValueError(f"DoraWeight: {problem}; to_dora() builds m for you.")

    @staticmethod
    def check_parts(fields: dict, like: "DoraWeight") -> str | None:
        """What is wrong with data ``fields`` for a node with ``like``'s static fields."""
        return (factor_problem(fields["w0"], fields["a"], fields["b"], like.in_axes)
                or _magnitude_problem(fields["w0"], fields["a"], fields["m"], like.in_axes))

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    def as_lora(self) -> LoraWeight:
        """The underlying ``V = w0 + s*a@b`` as a :class:`LoraWeight`."""
        return LoraWeight(self.w0, self.a, self.b, alpha=self.alpha, rslora=self.rslora,
                          in_axes=self.in_axes)

    def weight_norm(self) -> jax.Array:
        """``||w0 + s*a@b||`` over I per output feature: [*S, *O] (not detached)."""
        return _column_norm(self.as_lora()).astype(self.dtype)

    def factor(self) -> jax.Array:
        """``m / stop_gradient(||V||)``: [*S, *O], the per-output multiplier."""
        n = lax.stop_gradient(self.weight_norm())
        return self.m.astype(n.dtype) / n

    def materialize(self) -> jax.Array:
        s = self.stack_ndim
        f = self.factor()
        f = jnp.expand_dims(f, tuple(s + j for j in self.in_axes))
        return self.as_lora().materialize() * f.astype(self.dtype)

    def astype(self, dtype) -> "DoraWeight":
        return dataclasses.replace(self, w0=self.w0.astype(dtype), a=self.a.astype(dtype),
                                   b=self.b.astype(dtype), m=self.m.astype(dtype))


def _magnitude_problem(w0, a, m, in_axes) -> str | None:
    """``m`` must be [*S, *O]: one magnitude per output feature of each stacked layer."""
    if w0 is None or a is None or m is None:
        return None
    s = a.ndim - len(in_axes) - 1
    shape = tuple(w0.shape)
    want = (*shape[:s], *(d for j, d in enumerate(shape[s:]) if j not in in_axes))
    if tuple(m.shape) != want:
        return f"m has shape {tuple(m.shape)}, but w0 {shape} needs {want} (one per output)"
    return None


def gram_norm(w0, a, b, scale) -> jax.Array:
    """``||w0 + scale * a @ b||`` over the input axis, in float32, without forming the sum.

    ``w0`` [..., I, O], ``a`` [..., I, r], ``b`` [..., r, O] (leading axes of size 1
    broadcast, so one ``w0`` [1, I, O] serves N adapters), ``scale`` a number or
    [..., 1]. Returns [..., O]:
    ``sqrt(||w0||^2 + 2s * sum_r b*(a^T w0) + s^2 * sum_r b*((a^T a) b))`` per column,
    clamped at 0 against rounding."""
    hi = lax.Precision.HIGHEST
    w0, a, b = (x.astype(jnp.float32) for x in (w0, a, b))
    scale = jnp.asarray(scale, jnp.float32)
    aw = jnp.einsum("...ir,...io->...ro", a, w0, precision=hi)
    gb = jnp.einsum("...ir,...iq,...qo->...ro", a, a, b, precision=hi)
    sq = (jnp.sum(jnp.square(w0), axis=-2) + 2.0 * scale * jnp.sum(b * aw, axis=-2)
          + jnp.square(scale) * jnp.sum(b * gb, axis=-2))
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def _flat_io(w: LoraWeight):
    """``(w0 [*S, I, O], a [*S, I, r], b [*S, r, O])`` with I and O flattened."""
    s, shape = w.stack_ndim, w.shape
    n_i = math.prod(shape[s + j] for j in w.in_axes)
    w0 = w.to_canonical(dense(w.w0)).reshape((*shape[:s], n_i, -1))
    return (w0, w.a.reshape((*shape[:s], n_i, w.rank)),
            w.b.reshape((*shape[:s], w.rank, w0.shape[-1])))


def _column_norm(w: LoraWeight) -> jax.Array:
    """L2 norm of ``w0 + s*a@b`` over its input axes, [*S, *O], in float32."""
    w0, a, b = _flat_io(w)
    s = w.stack_ndim
    return gram_norm(w0, a, b, w.scale).reshape((*w.shape[:s],
                                                 *(w.shape[s + j] for j in w.out_axes)))


@register("dot_general", DoraWeight)
def _dora_dot_rule(eqn, invals, ctx):
    lhs, rhs = invals
    if isinstance(rhs, DoraWeight) and not is_implicit(lhs):
        w, swapped = rhs, False
    elif isinstance(lhs, DoraWeight) and not is_implicit(rhs):
        w, swapped = lhs, True
    else:
        return NotImplemented
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    wc, wb = (lc, lb) if swapped else (rc, rb)
    s = w.stack_ndim
    # DoRA scales output features: only a contraction over exactly the input axes I
    # (stacked axes as batch, in order) keeps the output features as free dims of the product.
    if set(wc) != {s + j for j in w.in_axes} or tuple(wb) != tuple(range(s)):
        return ctx.decline(
            f"meets a dot_general contracting axes {tuple(wc)} (batch {tuple(wb)}); DoRA "
            f"factors only a contraction over its input axes {w.in_axes} with stacked axes "
            "batched.")
    lw = w.as_lora()
    out = dot_rule(eqn, (lhs, lw) if not swapped else (lw, rhs), ctx)
    if out is NotImplemented:
        return NotImplemented
    f = w.factor().astype(out.dtype)                     # [*S, *O]
    n_out = len(w.out_axes)
    n_xfree = out.ndim - s - n_out
    if swapped:   # [*S, *O, x_free]
        f = f.reshape((*f.shape, *(1,) * n_xfree))
    else:         # [*S, x_free, *O]
        f = f.reshape((*f.shape[:s], *(1,) * n_xfree, *f.shape[s:]))
    return out * f


def _via_lora(eqn, invals, ctx, w: DoraWeight, out_axis: int):
    """The primitive with ``w`` replaced by its ``V`` (so the LoraWeight rules keep it
    factored), scaled by ``m / ||V||`` along the output's feature axis ``out_axis``."""
    lw = w.as_lora()
    ctx.set_name(lw, ctx.name(w))
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
             for v in eqn.invars]
    closed = jax.make_jaxpr(lambda *args: compat.bind(eqn, *args))(*avals)
    (out,) = ctx.eval(closed.jaxpr, closed.consts, [lw if v is w else v for v in invals])
    f = w.factor().astype(out.dtype)
    return out * f.reshape([f.shape[0] if i == out_axis else 1 for i in range(out.ndim)])


@register("conv_general_dilated", DoraWeight)
def _dora_conv_rule(eqn, invals, ctx):
    x, w = invals
    if not isinstance(w, DoraWeight) or is_implicit(x) or w.stack_ndim:
        return NotImplemented
    dn = eqn.params["dimension_numbers"]
    if len(w.out_axes) != 1 or w.out_axes[0] != dn.rhs_spec[0]:
        return ctx.decline(f"meets a convolution whose output-feature axis is "
                           f"{dn.rhs_spec[0]}, but its layout has input axes {w.in_axes}.")
    # Output channel o of any convolution (grouped too) reads only kernel slice o, so
    # DoRA's per-channel factor moves from the kernel to the output.
    return _via_lora(eqn, invals, ctx, w, dn.out_spec[1])


@register("transpose", DoraWeight)
def _dora_transpose_rule(eqn, invals, ctx):
    (w,) = invals
    perm, s = tuple(eqn.params["permutation"]), w.stack_ndim
    if perm[:s] != tuple(range(s)):
        return ctx.decline("is transposed across its stacked-layer axes.")
    lw = transpose_rule(eqn, (w.as_lora(),), ctx)
    # m [*S, *O] follows B's output axes to their new order
    new_pos = {old - s: new for new, old in enumerate(perm[s:])}
    order = sorted(range(len(w.out_axes)), key=lambda k: new_pos[w.out_axes[k]])
    m = lax.transpose(w.m, (*range(s), *(s + k for k in order)))
    return DoraWeight(lw.w0, lw.a, lw.b, m, alpha=w.alpha, rslora=w.rslora, in_axes=lw.in_axes)


def _dora_scalar_rule(eqn, invals, ctx):
    """``W' * c`` scales the magnitude: ``c * m * V / ||V||``."""
    w = next(x for x in invals if isinstance(x, DoraWeight))
    c = scalar_operand(eqn, invals, w)
    if c is None:
        return ctx.decline(f"meets '{eqn.primitive.name}' with an array that is not a scalar.")
    cm = jnp.asarray(c, w.m.dtype)
    return dataclasses.replace(w, m=w.m / cm if eqn.primitive.name == "div" else w.m * cm)


for _prim in ("mul", "div"):
    register(_prim, DoraWeight, _dora_scalar_rule)


@register("neg", DoraWeight)
def _dora_neg_rule(eqn, invals, ctx):
    (w,) = invals
    return dataclasses.replace(w, m=-w.m)


@register("gather", DoraWeight)
def _dora_gather_rule(eqn, invals, ctx):
    w, idx = invals
    if not isinstance(w, DoraWeight) or is_implicit(idx) or w.stack_ndim \
            or len(w.shape) != 2 or w.in_axes != (0,) or not is_row_lookup(eqn, w):
        return NotImplemented
    return _via_lora(eqn, invals, ctx, w, eqn.params["dimension_numbers"].offset_dims[-1])


def is_lora_or_dora(x) -> bool:
    return isinstance(x, (LoraWeight, DoraWeight))


def to_dora(params):
    """Every :class:`LoraWeight` in ``params`` becomes a :class:`DoraWeight` with
    ``m = ||w0 + s*a@b||`` (so the model is unchanged). An embedding table [V, D] gets
    one magnitude per feature D, its norm over the vocabulary (PEFT's DoRA embedding)."""
    checks.tree("to_dora", "params", params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora_or_dora)
    out, n = [], 0
    for kp, leaf in flat:
        if isinstance(leaf, LoraWeight):
            path = path_str(kp)
            if leaf.a is None or leaf.b is None or leaf.w0 is None:
                raise ValueError(f"to_dora: leaf {path!r} lacks w0/a/b (a half from split?); "
                                 "call to_dora on the full lorafied tree.")
            m = _column_norm(leaf).astype(leaf.dtype)
            leaf = DoraWeight(leaf.w0, leaf.a, leaf.b, m, alpha=leaf.alpha, rslora=leaf.rslora,
                              in_axes=leaf.in_axes)
            n += 1
        out.append(leaf)
    if not n:
        raise ValueError("to_dora: params hold no LoraWeight; lorafy() them first.")
    return jax.tree_util.tree_unflatten(treedef, out)


def dorafy(params, rank: int = 8, **lorafy_kwargs):
    """``to_dora(lorafy(params, rank, **lorafy_kwargs))``: PEFT's ``use_dora=True``."""
    return to_dora(lorafy(params, rank, **lorafy_kwargs))
