"""LoRA variants: DoRA nodes, PiSSA / OLoRA initialisation and the LoRA+ optimizer.

* :class:`DoraWeight` (``to_dora`` / ``dorafy``): weight-decomposed LoRA (Liu et al. 2024),
  as PEFT's ``use_dora=True``::

      W' = m * V / stop_gradient(||V||),   V = w0 + s * a @ b

  with the norm taken per output feature over the input axes I (PEFT: ``weight [out, in]``,
  ``norm(dim=1)``) and detached, as PEFT does (DoRA paper, sec. 4.3). Under ``lora(fn)``
  ``x @ W'`` is computed as ``(x@w0 + s*(x@a)@b) * m / ||V||``: like PEFT it forms
  ``V`` once per call to take its column norms, never a gradient with respect to it.
  ``m`` starts as ``||w0 + s*a@b||`` (= ``||w0||`` with B = 0), so a fresh DoRA model
  equals the base. A quantized ``w0`` is dequantized for the norm (inside jit).

* :func:`pissa_init` / :func:`olora_init`: take a lorafied tree and return it with A/B
  from the SVD / QR of ``w0`` and ``w0 := w0 - s*a@b``, so the model still starts as
  the base; the same factors as PEFT's ``init_lora_weights="pissa"`` / ``"olora"``
  (singular vectors up to sign).

* :func:`loraplus_optimizer`: LoRA+ (Hayou et al. 2024), B's learning rate ``ratio``
  times A's through ``optax.partition``; DoRA magnitudes go with B, as in PEFT's
  ``create_loraplus_optimizer`` (1-D parameters join B's group).

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

from lora_jax.lora import transform as _transform
from lora_jax.core.tree import path_str
from lora_jax.lora.weight import AdapterNode, LoraWeight, is_adapter, lora_scale
from lora_jax.core.implicit import ImplicitArray, node as _node, is_implicit, static

__all__ = [
    "DoraWeight",
    "dorafy",
    "to_dora",
    "pissa_init",
    "olora_init",
    "loraplus_labels",
    "loraplus_optimizer",
]


# ----------------------------------------------------------------------------- DoRA node

@_node
@dataclasses.dataclass(frozen=True)
class DoraWeight(AdapterNode):
    """Stands for ``m * V / stop_gradient(||V||_col)``, ``V = w0 + scale * a @ b``.

    Shapes (as :class:`LoraWeight`, plus the magnitude)::

        w0: [*S, *I, *O]   a: [*S, *I, r]   b: [*S, r, *O]   m: [*S, *O]

    ``||V||_col`` is the L2 norm over the input axes I for each output feature (and
    each stacked layer). ``a``, ``b`` and ``m`` train; ``w0`` is frozen.
    """

    w0: Any
    a: Any
    b: Any
    m: Any
    alpha: float = static(8.0)
    rslora: bool = static(False)
    in_ndim: int = static(1)

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b", "m")

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def stack_ndim(self) -> int:
        return self.a.ndim - self.in_ndim - 1

    def as_lora(self) -> LoraWeight:
        """The underlying ``V = w0 + s*a@b`` as a :class:`LoraWeight`."""
        return LoraWeight(self.w0, self.a, self.b, alpha=self.alpha, rslora=self.rslora,
                          in_ndim=self.in_ndim)

    def weight_norm(self) -> jax.Array:
        """``||w0 + s*a@b||`` over I per output feature: [*S, *O] (not detached)."""
        return _column_norm(self.as_lora(), self.in_ndim).astype(self.dtype)

    def factor(self) -> jax.Array:
        """``m / stop_gradient(||V||)``: [*S, *O], the per-output multiplier."""
        n = lax.stop_gradient(self.weight_norm())
        return self.m.astype(n.dtype) / n

    def materialize(self) -> jax.Array:
        s, n_in = self.stack_ndim, self.in_ndim
        f = self.factor()
        f = f.reshape((*f.shape[:s], *(1,) * n_in, *f.shape[s:]))
        return self.as_lora().materialize() * f.astype(self.dtype)

    def astype(self, dtype) -> "DoraWeight":
        return dataclasses.replace(self, w0=self.w0.astype(dtype), a=self.a.astype(dtype),
                                   b=self.b.astype(dtype), m=self.m.astype(dtype))


def _column_norm(w: LoraWeight, in_ndim: int) -> jax.Array:
    """L2 norm of the formed ``w0 + s*a@b`` over its input axes, in float32."""
    v = w.materialize().astype(jnp.float32)
    s = w.stack_ndim
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(s, s + in_ndim))))


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
    s, n_in = w.stack_ndim, w.in_ndim
    # DoRA scales output features: only a contraction over exactly the input axes I
    # (stacked axes as batch) keeps the output features as free dims of the product.
    if set(wb) != set(range(s)) or set(wc) != set(range(s, s + n_in)) or tuple(wb) != tuple(range(s)):
        return NotImplemented
    lw = w.as_lora()
    out = _transform._dot_general_rule(eqn, (lhs, lw) if not swapped else (lw, rhs), ctx)
    if out is NotImplemented:
        return NotImplemented
    f = w.factor().astype(out.dtype)                     # [*S, *O]
    n_out = len(w.shape) - s - n_in
    n_xfree = out.ndim - s - n_out
    if swapped:   # [*S, *O, x_free]
        f = f.reshape((*f.shape, *(1,) * n_xfree))
    else:         # [*S, x_free, *O]
        f = f.reshape((*f.shape[:s], *(1,) * n_xfree, *f.shape[s:]))
    return out * f


_transform.register_dot_rule(DoraWeight, _dora_dot_rule)


def _is_node(x) -> bool:
    return isinstance(x, (LoraWeight, DoraWeight))


def to_dora(params):
    """Every :class:`LoraWeight` in ``params`` becomes a :class:`DoraWeight` with
    ``m = ||w0 + s*a@b||`` (so the model is unchanged). Embedding tables are refused."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)
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
            m = _column_norm(leaf, leaf.in_ndim).astype(leaf.dtype)
            leaf = DoraWeight(leaf.w0, leaf.a, leaf.b, m, alpha=leaf.alpha, rslora=leaf.rslora,
                              in_ndim=leaf.in_ndim)
            n += 1
        out.append(leaf)
    if not n:
        raise ValueError("to_dora: params hold no LoraWeight; lorafy() them first.")
    return jax.tree_util.tree_unflatten(treedef, out)


def dorafy(params, rank: int = 8, **lorafy_kwargs):
    """``to_dora(lorafy(params, rank, **lorafy_kwargs))``: PEFT's ``use_dora=True``."""
    from lora_jax.lora.lorafy import lorafy
    return to_dora(lorafy(params, rank, **lorafy_kwargs))


# ----------------------------------------------------------------------------- PiSSA / OLoRA

def _per_layer(w: LoraWeight):
    """(w0 as float32 [P, fan_in, fan_out], S shape, I shape, O shape)."""
    if is_implicit(w.w0) or not hasattr(w.w0, "dtype"):
        raise TypeError(
            f"the base weight is a {type(w.w0).__name__}; PiSSA/OLoRA need a float base. "
            "Initialise on the float model and quantize the residual afterwards "
            "(as PEFT requires for PiSSA).")
    if not jnp.issubdtype(w.w0.dtype, jnp.floating):
        raise TypeError(f"the base weight has dtype {w.w0.dtype}; PiSSA/OLoRA need a float base.")
    s, n_in = w.stack_ndim, w.in_ndim
    shape = w.shape
    S, I, O = shape[:s], shape[s:s + n_in], shape[s + n_in:]
    w0 = jnp.asarray(w.w0, jnp.float32).reshape(math.prod(S), math.prod(I), math.prod(O))
    return w0, S, I, O


def _rebuild(w: LoraWeight, w0f, af, bf, S, I, O) -> LoraWeight:
    r = w.rank
    return dataclasses.replace(
        w, w0=w0f.reshape((*S, *I, *O)).astype(w.w0.dtype),
        a=af.reshape((*S, *I, r)).astype(w.a.dtype), b=bf.reshape((*S, r, *O)).astype(w.b.dtype))


def _map_init(params, fn, what: str):
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_node)
    out, n = [], 0
    for kp, leaf in flat:
        if isinstance(leaf, DoraWeight):
            raise TypeError(f"{what}: leaf {path_str(kp)!r} is a DoraWeight; initialise the "
                            "LoraWeight tree first, then call to_dora().")
        if isinstance(leaf, LoraWeight):
            try:
                leaf = fn(leaf)
            except TypeError as e:
                raise TypeError(f"{what}: leaf {path_str(kp)!r}: {e}") from None
            n += 1
        out.append(leaf)
    if not n:
        raise ValueError(f"{what}: params hold no LoraWeight; lorafy() them first.")
    return jax.tree_util.tree_unflatten(treedef, out)


def pissa_init(params):
    """PiSSA: A/B from the top-r SVD of ``w0``, ``w0 := w0 - s*a@b`` (PEFT ``"pissa"``).

    With ``w0 = U diag(S) Vh`` (our (in, out) layout, per stacked layer, I and O
    flattened): ``a = U[:, :r] * sqrt(S_r / s)``, ``b = sqrt(S_r / s)[:, None] * Vh[:r]``.
    PEFT computes the same factors from the torch weight ``W = w0.T`` (``lora_A = a.T``,
    ``lora_B = b.T``), singular vectors up to a common sign per pair. Computed in float32
    and cast back to each leaf's dtype, as PEFT does.
    """
    def one(w: LoraWeight):
        w0, S, I, O = _per_layer(w)
        r, s = w.rank, w.scale
        u, sv, vh = jnp.linalg.svd(w0, full_matrices=False)
        root = jnp.sqrt(sv[:, :r] / s)                               # [P, r]
        a = u[:, :, :r] * root[:, None, :]
        b = root[:, :, None] * vh[:, :r, :]
        res = w0 - s * jnp.einsum("pir,pro->pio", a, b, precision=lax.Precision.HIGHEST)
        return _rebuild(w, res, a, b, S, I, O)
    return _map_init(params, one, "pissa_init")


def olora_init(params):
    """OLoRA: A/B from the QR of the torch-layout weight, ``w0 := w0 - s*a@b`` (PEFT ``"olora"``).

    PEFT: ``Q, R = qr(W)`` with ``W = w0.T [out, in]``, ``lora_B = Q[:, :r]``,
    ``lora_A = R[:r]``; here ``b = Q[:, :r].T``, ``a = R[:r].T`` (A is not rescaled by
    ``1/s``, as in PEFT).
    """
    def one(w: LoraWeight):
        w0, S, I, O = _per_layer(w)
        r, s = w.rank, w.scale
        q, rr = jnp.linalg.qr(jnp.swapaxes(w0, 1, 2))                # [P,out,k], [P,k,in]
        b = jnp.swapaxes(q[:, :, :r], 1, 2)                          # [P, r, out]
        a = jnp.swapaxes(rr[:, :r, :], 1, 2)                         # [P, in, r]
        res = w0 - s * jnp.einsum("pir,pro->pio", a, b, precision=lax.Precision.HIGHEST)
        return _rebuild(w, res, a, b, S, I, O)
    return _map_init(params, one, "olora_init")


# ----------------------------------------------------------------------------- LoRA+

_A, _B, _EMB, _FROZEN = "lora_a", "lora_b", "lora_embedding", "frozen"


def loraplus_labels(params, *, embedding: bool = False):
    """``optax.partition`` labels: ``"lora_a"`` on A, ``"lora_b"`` on B and DoRA's ``m``,
    ``"frozen"`` elsewhere (``w0``, biases, ...). With ``embedding=True`` the factors of
    embedding tables (leaf name ``embedding``) get ``"lora_embedding"``. Works on a full
    tree or on the trainable half from a split (``None`` holes stay ``None``)."""
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
    import optax

    if not (isinstance(ratio, (int, float)) and ratio > 0):
        raise ValueError(f"loraplus_optimizer: ratio must be a positive number, got {ratio!r} "
                         "(LoRA+ suggests 2..16; PEFT calls it loraplus_lr_ratio).")
    if params is not None and not any(
            is_adapter(x)
            for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, ImplicitArray))):
        raise ValueError("loraplus_optimizer: params hold no LoRA node; lorafy() them first.")
    emb_tx = None
    if isinstance(tx, (int, float)) and not isinstance(tx, bool):
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
                        f"tx(learning_rate) or an optax GradientTransformation; got {type(tx).__name__}.")
    transforms = {_A: a_tx, _B: b_tx, _FROZEN: optax.set_to_zero()}
    if emb_tx is not None:
        transforms[_EMB] = emb_tx
    embedding = emb_tx is not None
    return optax.partition(transforms, lambda p: loraplus_labels(p, embedding=embedding))
