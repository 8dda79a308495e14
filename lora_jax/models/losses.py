"""Next-token cross-entropy that never holds the full-vocabulary logits.

A causal LM's loss on ``[B, T]`` tokens normally forms ``[B, T, V]`` float32 logits, keeps
them for the backward pass and forms a second array of the same size for their gradient:
for SmolLM2 (V = 49152) at 4 x 512 tokens that is 400 MB each, and on CPU the copies and
relayouts around them cost more than the head's matmul. :func:`fused_cross_entropy` takes
the final hidden states instead and walks the tokens in chunks: each chunk's logits are
formed, reduced to its loss, and turned at once into the gradient with respect to the
hidden states (``(softmax - onehot) @ W^T``, a ``[chunk, D]`` array), which is all the
backward pass keeps. The head's matmuls are the same two an unfused loss runs (the
forward logits and the hidden-state gradient); nothing is recomputed.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> h = jax.random.normal(jax.random.key(0), (13, 7))           # [N, D]
    >>> w = jax.random.normal(jax.random.key(1), (7, 11))           # [D, V]
    >>> y = jnp.arange(13, dtype=jnp.int32) % 11
    >>> ref = optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()
    >>> bool(jnp.allclose(fused_cross_entropy(h, w, y, chunk=4), ref, atol=1e-5))
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["fused_cross_entropy", "lm_loss"]


def _chunks(x, chunk: int, fill=0):
    """``x`` [N, ...] -> [ceil(N / chunk), chunk, ...], padded with ``fill``."""
    pad = -x.shape[0] % chunk
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill)
    return x.reshape((-1, chunk) + x.shape[1:])


def _loss_and_grads(h, w, labels, weights, chunk: int, head_grad: bool):
    """Sum of ``weights * CE`` and its gradients (w.r.t. ``h``; ``w`` if ``head_grad``)."""
    n, d = h.shape
    hc, yc, mc = _chunks(h, chunk), _chunks(labels, chunk), _chunks(weights, chunk)
    wf = w.astype(jnp.float32)

    def one(dw, xs):
        hx, y, m = xs
        logits = jnp.dot(hx.astype(jnp.float32), wf)                 # [C, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[:, None], axis=-1)[:, 0]
        p = jnp.exp(logits - lse[:, None])
        dlogits = (p - jax.nn.one_hot(y, w.shape[1], dtype=p.dtype)) * m[:, None]
        dh = jnp.dot(dlogits, wf.T)                                   # [C, D]
        if head_grad:
            dw = dw + jnp.dot(hx.astype(jnp.float32).T, dlogits)      # [D, V]
        return dw, (jnp.sum((lse - picked) * m), dh)

    dw0 = jnp.zeros(w.shape if head_grad else (), jnp.float32)
    dw, (losses, dh) = lax.scan(one, dw0, (hc, yc, mc))
    dh = dh.reshape(-1, d)[:n].astype(h.dtype)
    return jnp.sum(losses), dh, (dw.astype(w.dtype) if head_grad else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(h, w, labels, weights, chunk, head_grad):
    return _loss_and_grads(h, w, labels, weights, chunk, head_grad)[0]


def _fused_fwd(h, w, labels, weights, chunk, head_grad):
    loss, dh, dw = _loss_and_grads(h, w, labels, weights, chunk, head_grad)
    # Without head_grad, w stands in for its zero gradient's shape (it is alive anyway).
    return loss, (dh, dw if head_grad else w, labels, weights)


def _fused_bwd(chunk, head_grad, res, g):
    dh, dw, labels, weights = res
    dw = g * dw if head_grad else jnp.zeros_like(dw)
    # Labels are integers (float0 cotangent); the weights are data, not differentiated.
    return g * dh, dw, jnp.zeros(labels.shape, jax.dtypes.float0), jnp.zeros_like(weights)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_cross_entropy(hidden, head, labels, *, where=None, chunk: int = 1024,
                        head_grad: bool = True):
    """Mean cross-entropy of ``softmax(hidden @ head)`` against ``labels``, chunked.

    Args:
      hidden: ``[..., D]`` final hidden states (after the last norm).
      head: ``[D, V]`` LM head (a tied embedding ``[V, D]`` is passed as ``embedding.T``).
      labels: int ``[...]`` target token ids, the shape of ``hidden`` without ``D``.
      where: optional ``[...]`` mask (bool or 0/1) of the tokens that count; the mean is
        over them. Default: every token.
      chunk: tokens per chunk (memory ``chunk x V`` floats at a time).
      head_grad: ``False`` treats ``head`` as a constant (its gradient is zero), which
        saves one matmul per chunk: right for LoRA, where the head is frozen.

    Returns the float32 mean loss. Its gradient with respect to ``hidden`` (and ``head``)
    equals that of the unfused ``optax.softmax_cross_entropy_with_integer_labels``.
    """
    d = hidden.shape[-1]
    if head.ndim != 2 or head.shape[0] != d:
        raise ValueError(f"fused_cross_entropy: head must be [D, V] with D = {d} (the last "
                         f"axis of hidden), got shape {head.shape}; pass a tied embedding "
                         f"[V, D] as embedding.T")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"fused_cross_entropy: labels shape {labels.shape} must be hidden's "
                         f"without its last axis, {hidden.shape[:-1]}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"fused_cross_entropy: chunk must be an integer >= 1, got {chunk!r}")
    weights = jnp.ones(labels.shape, jnp.float32) if where is None else \
        jnp.asarray(where).astype(jnp.float32)
    h, y, m = hidden.reshape(-1, d), labels.reshape(-1).astype(jnp.int32), weights.reshape(-1)
    chunk = min(chunk, h.shape[0])
    w = head if head_grad else lax.stop_gradient(head)
    return _fused(h, w, y, m, chunk, bool(head_grad)) / jnp.maximum(jnp.sum(m), 1.0)


def lm_loss(model, params, ids, *, where=None, chunk: int = 1024, head_grad: bool = True,
            **kwargs):
    """Mean next-token loss of a :class:`~lora_jax.models.LlamaForCausalLM` on ``ids``
    ``[B, T]`` through :func:`fused_cross_entropy`: the model runs up to its final norm
    (the full logits it would return are dead code under jit) and its head (tied
    embedding or ``lm_head``) is applied chunk by chunk. ``where`` ``[B, T - 1]`` masks
    the predicted tokens; ``kwargs`` go to ``model.apply``. For LoRA, wrap it as
    ``lora(lambda p, ids: lm_loss(model, p, ids, head_grad=False))``.
    """
    _, state = model.apply({"params": params}, ids, mutable=["intermediates"],
                           capture_intermediates=lambda mdl, _: mdl.name == "norm", **kwargs)
    h = state["intermediates"]["norm"]["__call__"][0]
    if model.config.tie_word_embeddings:
        head = params["embed_tokens"]["embedding"].T
    else:
        head = params["lm_head"]["kernel"]
    return fused_cross_entropy(h[:, :-1], head, ids[:, 1:], where=where, chunk=chunk,
                               head_grad=head_grad)
