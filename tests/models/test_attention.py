"""attention(): the textbook softmax attention in value and gradients, without its residuals."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models.attention import attention


def textbook(q, k, v, mask):
    """softmax(q kᵀ / sqrt(hd), masked) v, differentiated by JAX itself."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, T, KV, H // KV, hd)
    s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    s = jnp.where(mask[:, None, None], s / math.sqrt(hd), -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(q.shape)


def inputs(key, B=2, T=5, S=7, H=6, KV=3, hd=4, dtype=jnp.float32):
    kq, kk, kv, km, kw = jax.random.split(key, 5)
    q = jax.random.normal(kq, (B, T, H, hd), dtype)
    k = jax.random.normal(kk, (B, S, KV, hd), dtype)
    v = jax.random.normal(kv, (B, S, KV, hd), dtype)
    mask = jax.random.bernoulli(km, 0.6, (B, T, S))
    mask = mask.at[1, 2].set(False)          # a query that sees no key at all
    w = jax.random.normal(kw, (B, T, H, hd), dtype)
    return q, k, v, mask, w


@pytest.mark.parametrize("H,KV", [(6, 3), (6, 1), (5, 5)])
def test_value_and_gradients_equal_the_textbook(key, H, KV):
    q, k, v, mask, w = inputs(key, H=H, KV=KV)

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v, mask) * w)

    np.testing.assert_allclose(attention(q, k, v, mask), textbook(q, k, v, mask), atol=1e-6)
    want = jax.grad(loss(textbook), (0, 1, 2))(q, k, v)
    got = jax.grad(loss(attention), (0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", got, want):
        np.testing.assert_allclose(g, e, atol=2e-5, err_msg=f"d{name}")


def test_jit_equals_eager_and_a_row_without_keys_averages_all_values(key):
    q, k, v, mask, w = inputs(key)
    out = attention(q, k, v, mask)
    np.testing.assert_allclose(jax.jit(attention)(q, k, v, mask), out, atol=1e-6)
    # query 2 of batch 1 sees no key: uniform weights, as the textbook -1e30 fill gives
    want = jnp.repeat(v[1].mean(axis=0), 2, axis=0)          # [H, hd]: kv head h // 2
    np.testing.assert_allclose(out[1, 2], want, atol=1e-6)
    g = jax.grad(lambda q: jnp.sum(attention(q, k, v, mask) * w))(q)
    assert not np.any(g[1, 2]), "a fully masked row's scores are constants"


def test_the_backward_keeps_no_score_sized_residual(key):
    B, T, H, hd = 1, 64, 4, 8
    q, k, v, mask, _ = inputs(key, B=B, T=T, S=T, H=H, KV=2, hd=hd)
    _, res = jax.vjp(lambda q, k, v: attention(q, k, v, mask), q, k, v)
    sizes = [x.size for x in jax.tree.leaves(res) if hasattr(x, "size")]
    assert max(sizes) < B * H * T * T, sizes          # the textbook keeps [B, H, T, T] probs


def test_bfloat16_keeps_dtypes_and_stays_close(key):
    q, k, v, mask, w = inputs(key, dtype=jnp.bfloat16)
    out = attention(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    np.testing.assert_allclose(out.astype(jnp.float32), textbook(*f32, mask), atol=3e-2)
    grads = jax.grad(lambda q, k, v: jnp.sum((attention(q, k, v, mask) * w)
                                             .astype(jnp.float32)), (0, 1, 2))(q, k, v)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3


def test_heads_that_do_not_divide_are_refused(key):
    q, k, v, mask, _ = inputs(key, H=5, KV=2)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attention(q, k, v, mask)


@pytest.mark.parametrize("T, blocks", [(512, 4), (258, 2), (255, 1)])
def test_causal_blocks_equal_the_textbook(key, T, blocks):
    """causal=True skips the score blocks above the diagonal, with padded keys. A query that
    sees no key at all (left padding) averages the keys of its block instead of all keys:
    no value there means anything, so those rows are left out (w = 0)."""
    from lora_jax.models.attention import _causal_blocks
    assert _causal_blocks(T) == blocks
    q, k, v, _, w = inputs(key, B=2, T=T, S=T, H=6, KV=3, hd=4)
    pad = jnp.ones((2, T), bool).at[0, 3].set(False).at[1, :2].set(False)
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & pad[:, None, :]
    seen = mask.any(-1)
    w = jnp.where(seen[:, :, None, None], w, 0.0)
    assert not seen.all(), "the rows without a key are there"

    def loss(f, **kw):
        return lambda q, k, v: jnp.sum(f(q, k, v, mask, **kw) * w)

    out = attention(q, k, v, mask, causal=True)
    np.testing.assert_allclose(out[seen], textbook(q, k, v, mask)[seen], atol=1e-5)
    want = jax.grad(loss(textbook), (0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss(attention, causal=True), (0, 1, 2)))(q, k, v)
    for name, g, e in zip("qkv", got, want):
        np.testing.assert_allclose(g, e, atol=5e-5, err_msg=f"d{name}")


def test_causal_needs_a_square_mask(key):
    q, k, v, mask, _ = inputs(key)          # T=5 queries, S=7 keys
    with pytest.raises(ValueError, match="as many keys as queries"):
        attention(q, k, v, mask, causal=True)
