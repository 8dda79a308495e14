"""Grouped-query softmax attention whose backward pass keeps no [T, S] tensor.

Differentiating the textbook ``softmax(q kᵀ) v`` makes every layer keep its [B, H, T, S]
probabilities for the backward pass; under ``nn.scan`` that is a stacked [L, B, H, T, S]
residual which XLA zero-fills, writes and reads back each step. On a 2-core CPU that
bookkeeping cost more than the attention matmuls themselves. :func:`attention` keeps only
q, k, v, the output and two per-row softmax statistics, and recomputes the probabilities in the
backward pass (the flash-attention backward, without tiling). The einsums run head-major
and are ordered so the [T, S]-sized operands are always consumed in their natural layout:
only the small [*, hd] operands are ever transposed.

    >>> import jax, jax.numpy as jnp
    >>> q = jnp.ones((1, 5, 6, 4)); k = v = jnp.ones((1, 5, 2, 4))   # 6 query, 2 kv heads
    >>> mask = jnp.tril(jnp.ones((5, 5), bool))[None]
    >>> attention(q, k, v, mask).shape
    (1, 5, 6, 4)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["attention"]

_MASKED = -1e30  # not -inf: a row with no visible key then averages all keys instead of NaN


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              causal: bool = False) -> jax.Array:
    """``softmax(q kᵀ / sqrt(hd) where mask) v`` for q [B, T, H, hd], k/v [B, S, KV, hd].

    ``mask`` is bool [B, T, S] (True = attend); H must be a multiple of KV (query head h
    reads kv head h // (H // KV)). Scores and softmax are float32; the output has q's dtype.
    ``causal=True`` promises that no query sees a later key (S == T and ``mask`` False above
    the diagonal: a sequence attending to itself, padding allowed). The score blocks above
    the diagonal are then skipped: row block i of n reads the keys up to its own end (so a
    query that sees no key at all, left padding, averages its block's values, not all of them).
    """
    B, T, H, hd = q.shape
    S, KV = k.shape[1], k.shape[2]
    if H % KV:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({KV})")
    if causal and S != T:
        raise ValueError(f"causal attention needs as many keys as queries, got {S} and {T}")
    n = _causal_blocks(T) if causal else 1
    size = T // n
    kh, vh = _heads(k, KV), _heads(v, KV)
    outs = []
    for i in range(n):
        rows, end = slice(i * size, (i + 1) * size), S if n == 1 else (i + 1) * size
        out = _attend(_heads(q[:, rows], KV), kh[:, :, :end], vh[:, :, :end],
                      mask[:, rows, :end])                              # [B, KV, G*size, hd]
        outs.append(out.reshape(B, KV, H // KV, size, hd).transpose(0, 3, 1, 2, 4)
                    .reshape(B, size, H, hd))
    return jnp.concatenate(outs, axis=1) if n > 1 else outs[0]


def _causal_blocks(T: int) -> int:
    """Row blocks of a causal attention over T tokens: n blocks compute (n + 1) / 2n of the
    scores. Blocks of fewer than 128 rows cost more in per-op overhead than they skip."""
    return next((n for n in (4, 2) if T % n == 0 and T // n >= 128), 1)


def _heads(x, kv):
    """[B, T, kv*G, hd] -> [B, kv, G*T, hd]: one matrix of rows per kv head."""
    B, T, H, hd = x.shape
    g = H // kv
    return x.reshape(B, T, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(B, kv, g * T, hd)


def _masked(x, mask, fill):
    """``x`` [B, KV, G*T, S] where ``mask`` [B, T, S] (each of the G rows of a query), else
    ``fill``."""
    B, KV, GT, S = x.shape
    T = mask.shape[1]
    x = jnp.where(mask[:, None, None], x.reshape(B, KV, GT // T, T, S), fill)
    return x.reshape(B, KV, GT, S)


def _scores(qh, kh, mask):
    """Scaled, masked float32 scores [B, KV, G*T, S]."""
    s = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    return _masked(s * (1.0 / math.sqrt(qh.shape[-1])), mask, _MASKED)


@jax.custom_vjp
def _attend(qh, kh, vh, mask):
    return _attend_fwd(qh, kh, vh, mask)[0]


def _attend_fwd(qh, kh, vh, mask):
    s = _scores(qh, kh, mask)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    p = (e / total).astype(vh.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", p, vh)
    # m and log(total) apart: in a row with no visible key m = -1e30 swallows log(S)
    return out, (qh, kh, vh, mask, out, m[..., 0], jnp.log(total)[..., 0])  # [B, KV, G*T]


def _attend_bwd(res, dout):
    qh, kh, vh, mask, out, m, log_total = res
    f32 = jnp.float32
    p = jnp.exp(_scores(qh, kh, mask) - m[..., None] - log_total[..., None])  # [B, KV, G*T, S]
    # Gradients w.r.t. k and v contract over the G*T rows: put the small [G*T, hd] operand
    # first so the [G*T, S] one is read as is, and transpose the small [hd, S] result.
    dv = jnp.einsum("bkqd,bkqs->bkds", dout, p.astype(dout.dtype), preferred_element_type=f32)
    dp = jnp.einsum("bkqd,bksd->bkqs", dout, vh, preferred_element_type=f32)
    delta = jnp.sum(dout.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
    # masked scores are constants: no gradient, even in a row where every key is masked
    ds = _masked(p * (dp - delta) * (1.0 / math.sqrt(qh.shape[-1])), mask, 0.0)
    dq = jnp.einsum("bkqs,bksd->bkqd", ds.astype(kh.dtype), kh, preferred_element_type=f32)
    dk = jnp.einsum("bkqd,bkqs->bkds", qh, ds.astype(qh.dtype), preferred_element_type=f32)
    return (dq.astype(qh.dtype), jnp.swapaxes(dk, -1, -2).astype(kh.dtype),
            jnp.swapaxes(dv, -1, -2).astype(vh.dtype), None)


_attend.defvjp(_attend_fwd, _attend_bwd)
