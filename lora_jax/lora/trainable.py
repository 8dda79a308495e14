"""Fully trainable leaves next to the adapters: PEFT's ``modules_to_save``.

:class:`Trainable` marks one array leaf (a classification head, a norm, an embedding
with new tokens) as trained in full. It is an adapter node whose one trainable field
is the array itself, so :func:`~lora_jax.split` puts it in the trainable half,
:func:`~lora_jax.lora_optimizer` gives it optimizer state, ``save_adapter`` saves it
(and leaves it out of the frozen-base fingerprint), :func:`~lora_jax.merge` and
:func:`~lora_jax.lora` unwrap it to the plain array, and ``to_peft``/``from_peft``
write and read it as PEFT writes a ``modules_to_save`` module.

Example:
    >>> import jax.numpy as jnp
    >>> p = mark_trainable({"head": {"kernel": jnp.ones((5, 3))}, "norm": jnp.ones(5)}, "head")
    >>> type(p["head"]["kernel"]).__name__, p["head"]["kernel"].shape
    ('Trainable', (5, 3))
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax

from lora_jax.core import (
    ImplicitArray,
    Targets,
    is_float_array,
    is_implicit,
    node,
    path_str,
    select_leaves,
)


@node
@dataclasses.dataclass(frozen=True)
class Trainable(ImplicitArray):
    """Stands for ``value`` itself, marking it as trained in full (``value`` may be
    ``None`` in the frozen half made by ``split``)."""

    value: Any

    trainable_fields: ClassVar[tuple[str, ...]] = ("value",)
    transparent: ClassVar[bool] = True

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self):
        return self.value.dtype

    def materialize(self) -> jax.Array:
        return self.value

    def astype(self, dtype) -> "Trainable":
        return Trainable(self.value.astype(dtype))


def trainable_paths(params, targets: Targets, what: str) -> set[str]:
    """The paths of the leaves ``targets`` marks, each checked to be a floating array."""
    out = set()
    for path, _, leaf in select_leaves(params, targets, what=what):
        if isinstance(leaf, Trainable):
            out.add(path)
            continue
        if is_implicit(leaf):
            raise ValueError(f"{what}: trainable leaf {path!r} is a {type(leaf).__name__}; only "
                             "plain arrays can be trained in full. merge() it first, or drop it "
                             "from trainable.")
        if not is_float_array(leaf):
            kind = getattr(leaf, "dtype", type(leaf).__name__)
            raise ValueError(f"{what}: trainable leaf {path!r} is {kind}, not a floating array; "
                             "drop it from trainable.")
        out.add(path)
    return out


def wrap_paths(params, paths: set[str]):
    """``params`` with the leaves at ``paths`` wrapped in :class:`Trainable`."""
    def wrap(kp, leaf):
        if path_str(kp) in paths and not isinstance(leaf, Trainable):
            return Trainable(leaf)
        return leaf
    return jax.tree_util.tree_map_with_path(wrap, params, is_leaf=is_implicit)


def mark_trainable(params, targets: Targets):
    """``params`` with the leaves ``targets`` picks trained in full (wrapped in
    :class:`Trainable`); ``targets`` as in :func:`~lora_jax.lorafy` (a regex, a list of
    them, or a predicate). ``lorafy(..., trainable=targets)`` does this in the same call."""
    if targets is None:
        raise ValueError("mark_trainable: targets is None; pass a regex, a list of them or a "
                         "predicate(path, leaf) naming the leaves to train in full.")
    return wrap_paths(params, trainable_paths(params, targets, "mark_trainable"))
