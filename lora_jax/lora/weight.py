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

from lora_jax.core.implicit import ImplicitArray, dense, node, static


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / (math.sqrt(rank) if rslora else rank)


class AdapterNode(ImplicitArray):
    """Base of nodes over a frozen ``w0`` with low-rank factors ``a`` [..., r] and ``b``."""

    @property
    def rank(self) -> int:
        return self.a.shape[-1]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w0.shape)

    @property
    def dtype(self):
        return self.w0.dtype


@node
@dataclasses.dataclass(frozen=True)
class LoraWeight(AdapterNode):
    """Stands for ``w0 + scale * a @ b`` in the (in, out) layout.

    Shapes, with S the leading stacked-layer axes (``nn.scan``), I the input
    (contracted) axes and O the output axes of the base weight::

        w0: [*S, *I, *O]   (an array or a QuantizedWeight)
        a:  [*S, *I, r]
        b:  [*S, r, *O]

    ``in_ndim`` = len(I) is static; S is whatever leads ``a`` beyond I and r,
    so slicing every leaf along axis 0 (as ``lax.scan`` does) yields the node
    of one layer. ``scale`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
    ``w0``, ``a`` or ``b`` may be ``None`` in the halves made by ``split``.
    """

    w0: Any
    a: Any
    b: Any
    alpha: float = static(8.0)
    rslora: bool = static(False)
    in_ndim: int = static(1)

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def stack_ndim(self) -> int:
        return self.a.ndim - self.in_ndim - 1

    def delta(self) -> jax.Array:
        """``scale * a @ b`` as an array [*S, *I, *O] (forms the full product)."""
        s = self.stack_ndim
        stack = tuple(range(s))
        ab = jax.lax.dot_general(
            self.a, self.b, (((self.a.ndim - 1,), (s,)), (stack, stack)))
        return (ab * jnp.asarray(self.scale, ab.dtype)).astype(self.dtype)

    def materialize(self) -> jax.Array:
        return dense(self.w0) + self.delta()

    def astype(self, dtype) -> "LoraWeight":
        w0 = self.w0.astype(dtype)
        return dataclasses.replace(self, w0=w0, a=self.a.astype(dtype), b=self.b.astype(dtype))




def is_adapter(x) -> bool:
    """A node with trainable fields: LoraWeight, DoraWeight, MultiLoraWeight, ..."""
    return isinstance(x, ImplicitArray) and bool(type(x).trainable_fields)
