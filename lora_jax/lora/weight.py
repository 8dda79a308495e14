"""Implicit weights: pytree nodes that stand for an array they never form.

A node behaves like an array of ``shape``/``dtype`` for ``lora(fn)``: where the
transform has a rule for the primitive that consumes it (``dot_general``,
``conv``, ``gather``, ...) it uses the node's factors; anywhere else it calls
``materialize()``. Because nodes are registered dataclasses, ``jit``, ``grad``,
``vmap``, ``lax.scan`` (which slices every leaf along axis 0), sharding and
orbax all see their plain array leaves.

Example:
    >>> import jax.numpy as jnp
    >>> w = LoraWeight(w0=jnp.ones((5, 7)), a=jnp.ones((5, 2)),
    ...                b=jnp.zeros((2, 7)), alpha=4.0)
    >>> w.shape, w.rank, w.scale
    ((5, 7), 2, 2.0)
    >>> bool((w.materialize() == 1.0).all())
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core import ImplicitArray, checks, dense, is_implicit, node, static


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


class AdapterNode(ImplicitArray):
    """Base of nodes over a frozen ``w0`` with low-rank factors ``a`` [..., r] and ``b``.

    ``in_axes`` are the positions, among the non-stacked axes of ``w0``, of the
    axes a function contracts with its input; the rest are output axes.
    Subclasses store ``in_axes`` (static); ``a`` is ``[*S, *I, r]`` after any extra axes
    of their own (MultiLoraWeight's adapter axis overrides ``stack_ndim``).
    """

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w0.shape)

    @property
    def dtype(self):
        return self.w0.dtype

    @property
    def in_ndim(self) -> int:
        return len(self.in_axes)

    @property
    def stack_ndim(self) -> int:
        return self.a.ndim - len(self.in_axes) - 1

    @property
    def out_axes(self) -> tuple[int, ...]:
        """Positions of the output axes among the non-stacked axes, ascending."""
        ins = set(self.in_axes)
        return tuple(j for j in range(len(self.shape) - self.stack_ndim) if j not in ins)

    def to_canonical(self, x) -> jax.Array:
        """An array in ``w0``'s axis order, rearranged to ``[*S, *I, *O]``."""
        s = self.stack_ndim
        return jnp.transpose(x, (*range(s), *(s + j for j in (*self.in_axes, *self.out_axes))))

    def from_canonical(self, x) -> jax.Array:
        """Inverse of :meth:`to_canonical`: ``[*S, *I, *O]`` to ``w0``'s axis order."""
        s = self.stack_ndim
        order = (*self.in_axes, *self.out_axes)
        return jnp.transpose(x, (*range(s), *(s + order.index(j) for j in range(len(order)))))


def in_axes_arg(in_axes, in_ndim) -> tuple[int, ...]:
    """``in_axes`` from the constructor's ``in_axes=`` or its ``in_ndim=k`` shorthand."""
    if in_ndim is not None:
        in_ndim = checks.positive_int("LoraWeight", "in_ndim", in_ndim)
    if in_axes is None:
        return tuple(range(1 if in_ndim is None else in_ndim))
    if not isinstance(in_axes, (tuple, list)) or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in in_axes):
        raise TypeError(f"LoraWeight: in_axes must be a tuple of ints (positions of the input "
                        f"axes, e.g. (0,)), got {in_axes!r}.")
    if in_ndim is not None and in_ndim != len(in_axes):
        raise ValueError(f"LoraWeight: in_ndim={in_ndim} disagrees with "
                         f"in_axes={tuple(in_axes)}; pass one of them.")
    return tuple(int(i) for i in in_axes)


def looks_like_factors(*parts) -> bool:
    """Whether a construction is checked: every given part a concrete array (or node) with
    ndim >= 2. Pytree unflattening skips the constructor (``core.implicit.node``); nodes a
    user builds from tracers, ShapeDtypeStructs or None halves pass unchecked."""
    given = [x for x in parts if x is not None]
    return bool(given) and all(
        getattr(x, "ndim", 0) >= 2 and (checks.is_concrete(x) or (
            is_implicit(x) and all(checks.is_concrete(v) for v in jax.tree.leaves(x))))
        for x in given)


def factor_problem(w0, a, b, in_axes) -> str | None:
    """What is inconsistent between ``w0`` [*S, ...], ``a`` [*S, *I, r] and ``b``
    [*S, r, *O] for ``in_axes`` (None when they fit). Parts may be None (a split half)."""
    if a is None:
        return None           # a frozen half (w0 only), or b alone: nothing to compare
    s = a.ndim - len(in_axes) - 1
    if s < 0:
        return (f"a has shape {tuple(a.shape)}, too few axes for {len(in_axes)} input axes "
                "plus the rank axis")
    r = a.shape[-1]
    if w0 is None:
        if b is not None and (b.ndim <= s or tuple(b.shape[:s + 1]) != (*a.shape[:s], r)):
            return (f"a of shape {tuple(a.shape)} and b of shape {tuple(b.shape)} disagree on "
                    "the stacked axes or the rank")
        return None
    shape = tuple(w0.shape)
    n = len(shape) - s
    if len(set(in_axes)) != len(in_axes) or any(not 0 <= j < n for j in in_axes) \
            or len(in_axes) >= n:
        return (f"in_axes={tuple(in_axes)} do not fit w0 of shape {shape} with {s} stacked "
                "axes (each input axis once, at least one output axis)")
    want_a = (*shape[:s], *(shape[s + j] for j in in_axes), r)
    if tuple(a.shape) != want_a:
        return (f"a has shape {tuple(a.shape)}, but w0 {shape} with in_axes {tuple(in_axes)} "
                f"needs {want_a} (stacked axes, input axes, rank)")
    want_b = (*shape[:s], r, *(shape[s + j] for j in range(n) if j not in in_axes))
    if b is not None and tuple(b.shape) != want_b:
        return (f"b has shape {tuple(b.shape)}, but w0 {shape} with in_axes {tuple(in_axes)} "
                f"and rank {r} needs {want_b} (stacked axes, rank, output axes)")
    return None


def check_node(what: str, w0, a, b, alpha, rslora, in_axes) -> None:
    """ValueError/TypeError naming the part of an adapter node that is wrong."""
    checks.number(what, "alpha", alpha, positive=False)
    checks.boolean(what, "rslora", rslora)
    problem = factor_problem(w0, a, b, in_axes)
    if problem:
        raise ValueError(f"{what}: {problem}. Build nodes with lorafy(), or pass w0, a, b "
                         "shaped as the class docstring says.")
    if a is not None and a.shape[-1] == 0:
        raise ValueError(f"{what}: a has rank 0 (shape {tuple(a.shape)}); LoRA needs rank >= 1.")


def _set_fields(obj, **fields) -> None:
    for name, value in fields.items():
        object.__setattr__(obj, name, value)


@node
@dataclasses.dataclass(frozen=True, init=False)
class LoraWeight(AdapterNode):
    """Stands for ``w0 + scale * a @ b``, the product arranged in ``w0``'s own axis order.

    With S the leading stacked-layer axes (``nn.scan``, ``hk.layer_stack``), I the
    input (contracted) axes at positions ``in_axes`` among the rest, and O the
    remaining output axes in ``w0``'s order::

        w0: [*S, ...]      (any axis order; an array or a QuantizedWeight)
        a:  [*S, *I, r]    (I in ``in_axes`` order)
        b:  [*S, r, *O]

    A Flax kernel ``(in, out)`` has ``in_axes=(0,)``; an Equinox/torch weight
    ``(out, in)`` has ``in_axes=(1,)``; a Gemma einsum kernel ``NDH`` contracted
    on D has ``in_axes=(1,)``. ``in_ndim=k`` is shorthand for ``in_axes=(0, ..., k-1)``.
    S is whatever leads ``a`` beyond I and r, so slicing every leaf along axis 0
    (as ``lax.scan`` does) yields the node of one layer. ``scale`` is ``alpha / r``
    (``alpha / sqrt(r)`` with rsLoRA). ``w0``, ``a`` or ``b`` may be ``None`` in the
    halves made by ``split``.
    """

    w0: Any
    a: Any
    b: Any
    alpha: float = static(8.0)
    rslora: bool = static(False)
    in_axes: tuple[int, ...] = static((0,))

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    def __init__(self, w0, a, b, *, alpha: float = 8.0, rslora: bool = False,
                 in_axes=None, in_ndim: int | None = None):
        in_axes = in_axes_arg(in_axes, in_ndim)
        if looks_like_factors(w0, a, b):
            check_node("LoraWeight", w0, a, b, alpha, rslora, in_axes)
        _set_fields(self, w0=w0, a=a, b=b, alpha=alpha, rslora=rslora, in_axes=in_axes)

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    @staticmethod
    def check_parts(fields: dict, like: "LoraWeight") -> str | None:
        """What is wrong with data ``fields`` for a node with ``like``'s static fields."""
        return factor_problem(fields["w0"], fields["a"], fields["b"], like.in_axes)

    def delta(self) -> jax.Array:
        """``scale * a @ b`` as an array of ``w0``'s shape (forms the full product)."""
        s = self.stack_ndim
        stack = tuple(range(s))
        ab = jax.lax.dot_general(
            self.a, self.b, (((self.a.ndim - 1,), (s,)), (stack, stack)))
        ab = self.from_canonical(ab)
        return (ab * jnp.asarray(self.scale, ab.dtype)).astype(self.dtype)

    def materialize(self) -> jax.Array:
        return dense(self.w0) + self.delta()

    def astype(self, dtype) -> "LoraWeight":
        w0 = self.w0.astype(dtype)
        return dataclasses.replace(self, w0=w0, a=self.a.astype(dtype), b=self.b.astype(dtype))


def is_adapter(x) -> bool:
    """A node with trainable fields: LoraWeight, DoraWeight, MultiLoraWeight, ..."""
    return isinstance(x, ImplicitArray) and bool(type(x).trainable_fields)
