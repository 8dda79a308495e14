"""LoRA+ (Hayou et al. 2024): B's learning rate ``ratio`` times A's, through
``optax.partition``; DoRA magnitudes go with B, as in PEFT's
``create_loraplus_optimizer`` (1-D parameters join B's group)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax

from lora_jax.core import ImplicitArray, checks, path_str
from lora_jax.lora import is_adapter

# ----------------------------------------------------------------------------- LoRA+

_A, _B, _EMB, _FROZEN = "lora_a", "lora_b", "lora_embedding", "frozen"


def loraplus_labels(params, *, embedding: bool = False):
    """``optax.partition`` labels: ``"lora_a"`` on A, ``"lora_b"`` on B and DoRA's ``m``,
    ``"frozen"`` elsewhere (``w0``, biases, ...). With ``embedding=True`` the factors of
    embedding tables (leaf name ``embedding``) get ``"lora_embedding"``. Works on a full
    tree or on the trainable half from a split (``None`` holes stay ``None``)."""
    checks.tree("loraplus_labels", "params", params)
    checks.boolean("loraplus_labels", "embedding", embedding)

    def is_node(x):
        return is_adapter(x)

    def label(kp, x):
        if not is_node(x):
            return jax.tree.map(lambda _: _FROZEN, x)
        emb = embedding and path_str(kp).rsplit("/", 1)[-1] == "embedding"
        trainable = type(x).trainable_fields
        new = {}
        for f in dataclasses.fields(x):
            if f.metadata.get("static"):
                continue
            v = getattr(x, f.name)
            if f.name in trainable:
                lab = _EMB if emb else (_A if f.name == "a" else _B)
            else:
                lab = _FROZEN
            new[f.name] = jax.tree.map(lambda _, lab=lab: lab, v)
        return dataclasses.replace(x, **new)

    return jax.tree_util.tree_map_with_path(label, params, is_leaf=is_node)


def loraplus_optimizer(tx: Any, params=None, *, ratio: float, lr: float | None = None,
                       embedding_lr: float | None = None):
    """LoRA+: B (and DoRA magnitudes) at ``ratio`` times A's learning rate; frozen leaves
    get zero updates and no state.

    ``tx`` is one of:
      * a learning rate (float): ``optax.adamw(lr, weight_decay=0)`` for A,
        ``optax.adamw(lr * ratio, weight_decay=0)`` for B;
      * a factory ``tx(learning_rate) -> GradientTransformation`` plus ``lr=``:
        ``tx(lr)`` for A, ``tx(lr * ratio)`` for B;
      * a ``GradientTransformation``: ``tx`` for A, ``optax.chain(tx, optax.scale(ratio))``
        for B (B's updates are exactly ``ratio`` times what ``tx`` would give it).
    ``embedding_lr`` (factory / float forms): A and B of embedding tables at that rate
    (PEFT's ``loraplus_lr_embedding``); by default they follow the A/B rule.
    ``params`` (optional) is only checked to hold LoRA nodes; labels are computed from
    whatever tree ``init`` gets, so it works on a full tree or a split's trainable half.
    """
    what = "loraplus_optimizer"
    if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and not ratio > 0:
        raise ValueError(f"{what}: ratio must be a positive number, got {ratio!r} (LoRA+ "
                         "suggests 2..16; PEFT calls it loraplus_lr_ratio).")
    ratio = checks.number(what, "ratio", ratio, fix="LoRA+ suggests 2..16.")
    if lr is not None:
        checks.number(what, "lr", lr, fix="lr is A's learning rate.")
    if embedding_lr is not None:
        checks.number(what, "embedding_lr", embedding_lr)
    if params is not None and not any(
            is_adapter(x)
            for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, ImplicitArray))):
        raise ValueError("loraplus_optimizer: params hold no LoRA node; lorafy() them first.")
    emb_tx = None
    if isinstance(tx, (int, float)) and not isinstance(tx, bool):
        checks.number(what, "tx (a learning rate)", tx)

        def factory(lr_):
            return optax.adamw(lr_, weight_decay=0.0)
        base_lr = float(tx)
        a_tx, b_tx = factory(base_lr), factory(base_lr * ratio)
        if embedding_lr is not None:
            emb_tx = factory(embedding_lr)
    elif hasattr(tx, "init") and hasattr(tx, "update"):
        if embedding_lr is not None:
            raise ValueError("loraplus_optimizer: embedding_lr needs tx as a learning rate or "
                             "a factory (tx(lr) -> GradientTransformation), not a built optimizer.")
        a_tx, b_tx = tx, optax.chain(tx, optax.scale(float(ratio)))
    elif callable(tx):
        if lr is None:
            raise ValueError("loraplus_optimizer: with a factory tx(learning_rate), pass lr= "
                             "(A's learning rate).")
        a_tx, b_tx = tx(lr), tx(lr * ratio)
        if embedding_lr is not None:
            emb_tx = tx(embedding_lr)
    else:
        raise TypeError("loraplus_optimizer: tx must be a learning rate, a factory "
                        "tx(learning_rate) or an optax GradientTransformation; got "
                        f"{type(tx).__name__}.")
    transforms = {_A: a_tx, _B: b_tx, _FROZEN: optax.set_to_zero()}
    if emb_tx is not None:
        transforms[_EMB] = emb_tx
    embedding = emb_tx is not None
    return optax.partition(transforms, lambda p: loraplus_labels(p, embedding=embedding))
