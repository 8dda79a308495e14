"""DoRA: weight-decomposed LoRA (Liu et al. 2024), as PEFT's ``use_dora=True``::

    W' = m * V / stop_gradient(||V||),   V = w0 + s * a @ b

with the norm taken per output feature over the input axes I (PEFT: ``weight [out, in]``,
``norm(dim=1)``) and detached, as PEFT does (DoRA paper, sec. 4.3). Under ``lora(fn)``
``x @ W'`` is computed as ``(x@w0 + s*(x@a)@b) * m / ||V||``: like PEFT it forms
``V`` once per call to take its column norms, never a gradient with respect to it.
``m`` starts as ``||w0 + s*a@b||`` (= ``||w0||`` with B = 0), so a fresh DoRA model
equals the base. A quantized ``w0`` is dequantized for the norm (inside jit).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import lorafy
    >>> p = to_dora(lorafy({"k": jnp.arange(35.0).reshape(5, 7)}, rank=2, targets="k"))
    >>> p["k"].m.shape, bool(jnp.allclose(p["k"].materialize(), p["k"].w0))
    ((7,), True)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core import checks, is_implicit, node, path_str, register, static
from lora_jax.lora import (
    AdapterNode,
    LoraWeight,
    check_node,
    dot_rule,
    factor_problem,
    looks_like_factors,
    lora_scale,
    lorafy,
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


def _column_norm(w: LoraWeight) -> jax.Array:
    """L2 norm of the formed ``w0 + s*a@b`` over its input axes, in float32."""
    v = w.materialize().astype(jnp.float32)
    s = w.stack_ndim
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(s + j for j in w.in_axes)))


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


def is_lora_or_dora(x) -> bool:
    return isinstance(x, (LoraWeight, DoraWeight))


def to_dora(params):
    """Every :class:`LoraWeight` in ``params`` becomes a :class:`DoraWeight` with
    ``m = ||w0 + s*a@b||`` (so the model is unchanged). Embedding tables are refused."""
    checks.tree("to_dora", "params", params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora_or_dora)
    out, n = [], 0
    for kp, leaf in flat:
        if isinstance(leaf, LoraWeight):
            path = path_str(kp)
            if path.rsplit("/", 1)[-1] == "embedding":
                raise ValueError(
                    f"to_dora: leaf {path!r} is an embedding table; PEFT's DoRA for embeddings "
                    "normalises per token row, which lora_jax does not implement. Exclude it "
                    "from lorafy's targets (or keep it a plain LoraWeight).")
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
