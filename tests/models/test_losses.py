"""fused_cross_entropy equals the unfused loss in value and gradients, without the logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import close
from lora_jax.models import fused_cross_entropy

N, D, V = 13, 7, 11     # 13 tokens: chunks of 4 and 5 leave a padded last chunk


def _data(key):
    kh, kw, ky, km = jax.random.split(key, 4)
    h = jax.random.normal(kh, (N, D))
    w = jax.random.normal(kw, (D, V))
    y = jax.random.randint(ky, (N,), 0, V, jnp.int32)
    m = jax.random.bernoulli(km, 0.7, (N,))
    return h, w, y, m


def _ref(h, w, y, m):
    ce = optax.softmax_cross_entropy_with_integer_labels(h @ w, y)
    return jnp.sum(ce * m) / jnp.sum(m)


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])
def test_value_and_gradients_equal_the_unfused_loss(key, chunk):
    h, w, y, m = _data(key)
    mf = m.astype(jnp.float32)
    ref, (rh, rw) = jax.value_and_grad(_ref, argnums=(0, 1))(h, w, y, mf)
    f = lambda h, w: fused_cross_entropy(h, w, y, where=m, chunk=chunk)
    got, (gh, gw) = jax.value_and_grad(f, argnums=(0, 1))(h, w)
    close(got, ref, 1e-5)
    close(gh, rh, 1e-5)
    close(gw, rw, 1e-5)
    jgot, (jgh, _) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)
    close(jgot, got, 1e-6)
    close(jgh, gh, 1e-6)


def test_frozen_head_and_batched_shapes(key):
    h, w, y, _ = _data(key)
    hb, yb = h[:12].reshape(3, 4, D), y[:12].reshape(3, 4)
    f = lambda h: fused_cross_entropy(hb * h, w, yb, chunk=5, head_grad=False)
    ref = lambda h: optax.softmax_cross_entropy_with_integer_labels((hb * h) @ w, yb).mean()
    close(jax.grad(f)(1.5), jax.grad(ref)(1.5), 1e-5)
    gw = jax.grad(lambda w: fused_cross_entropy(hb, w, yb, head_grad=False))(w)
    np.testing.assert_array_equal(np.asarray(gw), 0.0)


def test_second_call_uses_the_upstream_gradient(key):
    h, w, y, _ = _data(key)
    f = lambda h: 3.0 * fused_cross_entropy(h, w, y, chunk=4)
    ref = lambda h: 3.0 * optax.softmax_cross_entropy_with_integer_labels(h @ w, y).mean()
    close(jax.grad(f)(h), jax.grad(ref)(h), 1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(head=jnp.zeros((V, D))), "head must be \\[D, V\\] with D = 7"),
    (dict(labels=jnp.zeros((N, 1), jnp.int32)), "labels shape"),
    (dict(chunk=0), "chunk must be an integer >= 1"),
])
def test_bad_arguments_name_themselves(key, kw, match):
    h, w, y, _ = _data(key)
    args = dict(head=w, labels=y) | kw
    with pytest.raises(ValueError, match=match):
        fused_cross_entropy(h, args["head"], args["labels"], chunk=kw.get("chunk", 4))


@pytest.mark.parametrize("tied", [True, False])
def test_lm_loss_equals_the_loss_on_the_model_logits(key, tied):
    import lora_jax as lj
    from helpers import SMALL_LLAMA, randomize_zero_factors
    from lora_jax.models import LlamaConfig, LlamaForCausalLM, lm_loss

    model = LlamaForCausalLM(LlamaConfig(**{**SMALL_LLAMA, "tie_word_embeddings": tied}))
    ids = jax.random.randint(key, (3, 9), 0, model.config.vocab_size, jnp.int32)
    params = model.init_params(key)
    where = jnp.arange(8)[None, :] >= jnp.array([[0], [2], [5]])    # answer-only masks

    def ref(p, apply=model.apply):
        ce = optax.softmax_cross_entropy_with_integer_labels(apply({"params": p}, ids)[:, :-1],
                                                             ids[:, 1:])
        wf = where.astype(jnp.float32)
        return jnp.sum(ce * wf) / jnp.sum(wf)

    full = lambda p: lm_loss(model, p, ids, where=where, chunk=7)
    close(full(params), ref(params), 1e-5)
    g, rg = jax.grad(full)(params), jax.grad(ref)(params)
    jax.tree.map(lambda a, b: close(a, b, 1e-4), g, rg)

    lp = randomize_zero_factors(lj.lorafy(params, rank=2, key=key,
                                          targets=r"layers/.*_proj/kernel"), key)
    tr, fr = lj.split(lp)
    ours = lj.lora(lambda p: lm_loss(model, p, ids, where=where, chunk=7, head_grad=False))
    theirs = lambda p: ref(p, lj.lora(model.apply))
    close(ours(lp), theirs(lp), 1e-5)
    g = jax.jit(jax.grad(lambda t: ours(lj.combine(t, fr))))(tr)
    rg = jax.grad(lambda t: theirs(lj.combine(t, fr)))(tr)
    jax.tree.map(lambda a, b: close(a, b, 1e-4), g, rg)
