"""Trainable vs frozen: split/combine with None holes, and the optax mask.

Only the ``trainable_fields`` of adapter nodes train (LoraWeight's ``a`` and
``b``; DoRA adds its magnitude ``m``); everything else — ``w0`` (array or
quantized codes), biases, norms, embeddings — is frozen.

Example:
    >>> import jax.numpy as jnp, optax
    >>> p = lorafy({"k": jnp.ones((5, 7))}, rank=2, targets="k")
    >>> trainable, frozen = split(p)
    >>> trainable["k"].w0 is None and frozen["k"].a is None
    True
    >>> combine(trainable, frozen)["k"].shape
    (5, 7)
    >>> tx = lora_optimizer(optax.adam(1e-3), p)   # Adam state for A and B only
    >>> state = tx.init(p)
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from lora_jax.lora.weight import is_adapter


def _map_adapters(fn_node, fn_other, tree):
    return jax.tree.map(lambda x: fn_node(x) if is_adapter(x) else fn_other(x), tree,
                        is_leaf=is_adapter)


def _data_fields(node):
    return [f.name for f in dataclasses.fields(node) if not f.metadata.get("static")]


def _fill(node, trainable_value, frozen_value):
    """``node``: trainable fields mapped by ``trainable_value``, the rest by ``frozen_value``."""
    keep = type(node).trainable_fields
    return dataclasses.replace(node, **{
        f: (trainable_value if f in keep else frozen_value)(getattr(node, f))
        for f in _data_fields(node)})


def trainable_mask(params):
    """A tree of bools with the structure of ``params``: True on adapter leaves (A, B, ...).

    Use with ``optax.masked(tx, mask)``; frozen leaves then get no optimizer state.
    """
    def false(x):
        return jax.tree.map(lambda _: False, x)

    def true(x):
        return jax.tree.map(lambda _: True, x)
    return _map_adapters(lambda n: _fill(n, true, false), false, params)


def trainable_labels(params):
    """``"trainable"`` on LoRA A/B leaves, ``"frozen"`` elsewhere: labels for ``optax.partition``.

    The result has the structure of ``params``; for an Equinox module (which
    optax would call as a function) pass ``lambda p: trainable_labels(p)``.
    """
    return jax.tree.map(lambda m: "trainable" if m else "frozen", trainable_mask(params))


def lora_optimizer(tx, params):
    """``tx`` on A/B, zero updates (and no state) for every other leaf.

    ``optax.masked(tx, mask)`` alone passes masked-out gradients through
    unchanged, so a full-tree step would still move biases and norms; this
    pairs it with ``optax.set_to_zero`` for the frozen leaves.
    """
    # A callable, because optax calls a callable labels tree, and an Equinox module is one.
    return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()},
                           lambda p: trainable_labels(p))


def split(params):
    """``(trainable, frozen)``: two trees shaped like ``params`` with ``None`` holes.

    ``trainable`` holds LoRA A/B; ``frozen`` holds everything else. Differentiate
    with respect to ``trainable`` only, so no full-size weight gradient is ever formed.
    """
    keep, drop = (lambda x: x), (lambda x: None)
    trainable = _map_adapters(lambda n: _fill(n, keep, drop), drop, params)
    frozen = _map_adapters(lambda n: _fill(n, drop, keep), keep, params)
    return trainable, frozen


def combine(*trees):
    """Inverse of :func:`split`: fill each ``None`` hole from the next tree that has a value."""
    def pick(*xs):
        for x in xs:
            if x is not None:
                return x
        return None
    return jax.tree.map(pick, *trees, is_leaf=lambda x: x is None)


def count_params(params) -> dict:
    """Element counts: ``{"trainable", "frozen", "total", "trainable_fraction"}``.

    ``frozen`` counts the logical elements of the base (a quantized weight counts
    its dequantized size), so the fraction is relative to the model, not its bytes.
    """
    trainable, frozen = 0, 0
    for leaf in jax.tree.leaves(params, is_leaf=is_adapter):
        if is_adapter(leaf):
            for f in _data_fields(leaf):
                v = getattr(leaf, f)
                if f in type(leaf).trainable_fields:
                    trainable += sum(_logical_size(x) for x in jax.tree.leaves(v))
                elif f == "w0":
                    frozen += _logical_size(v)
        else:
            frozen += _logical_size(leaf)
    total = trainable + frozen
    return {"trainable": trainable, "frozen": frozen, "total": total,
            "trainable_fraction": trainable / total if total else 0.0}


def _logical_size(x) -> int:
    if x is None:
        return 0
    shape = getattr(x, "shape", ())
    n = 1
    for d in shape:
        n *= int(d)
    return n
