"""Implicit arrays: pytree nodes that stand for an array they never form.

A node behaves like an array of ``shape``/``dtype`` for an interpreted function:
where a rule exists for the primitive that consumes it, the rule uses the
node's parts; anywhere else the node is formed with ``materialize()``. Nodes are
registered dataclasses, so ``jit``, ``grad``, ``vmap``, ``lax.scan``, sharding
and orbax all see their plain array leaves.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax


class ImplicitArray:
    """Base of the nodes ``lora(fn)`` understands.

    Subclasses are frozen dataclasses registered as pytrees. ``shape`` and
    ``dtype`` must be derived from the leaves (not stored) so that a node
    sliced by ``lax.scan`` or batched by ``vmap`` still reports its own shape.
    ``trainable_fields`` names the fields an optimizer updates (adapter nodes:
    LoRA's ``a``, ``b``; DoRA adds ``m``); empty for frozen nodes (quantized bases).
    A ``transparent`` node only marks an array (e.g. as trainable): the interpreter
    replaces it by ``materialize()`` before tracing, so no rule ever sees it.
    """

    shape: tuple[int, ...]
    dtype: Any
    trainable_fields: ClassVar[tuple[str, ...]] = ()
    transparent: ClassVar[bool] = False

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def materialize(self) -> jax.Array:
        raise NotImplementedError

    def astype(self, dtype) -> "ImplicitArray":
        raise NotImplementedError

    def __jax_array__(self):
        # Lets plain (untransformed) code use a node, at the price of forming it.
        return self.materialize()


def dense(x):
    return x.materialize() if isinstance(x, ImplicitArray) else x


def node(cls):
    """Register a dataclass as a pytree; fields with ``static=True`` metadata are aux data.

    Unflattening rebuilds a node field by field, without ``__init__``/``__post_init__``:
    their checks are for a user's construction, while a transformation may put anything
    in the leaves (``jax.hessian`` puts a whole tree of per-leaf blocks in each one).
    """
    fields = dataclasses.fields(cls)
    data = tuple(f.name for f in fields if not f.metadata.get("static"))
    meta = tuple(f.name for f in fields if f.metadata.get("static"))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in data)

    def flatten(x):
        return [getattr(x, name) for name in data], tuple(getattr(x, name) for name in meta)

    def flatten_with_keys(x):
        children, aux = flatten(x)
        return list(zip(keys, children)), aux

    def unflatten(aux, children):
        x = object.__new__(cls)
        for name, value in (*zip(data, children), *zip(meta, aux)):
            object.__setattr__(x, name, value)
        return x

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls


def static(default=dataclasses.MISSING):
    return dataclasses.field(default=default, metadata={"static": True})



def is_implicit(x) -> bool:
    return isinstance(x, ImplicitArray)
