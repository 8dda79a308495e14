"""Shared test utilities: random adapters and the merged-vs-lora comparison."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj


def randomize_b(params, key, scale=0.3):
    """Give every LoraWeight a random B so the adapter changes the output."""
    flat, treedef = jax.tree.flatten(params, is_leaf=lambda x: isinstance(x, lj.LoraWeight))
    keys = jax.random.split(key, len(flat))
    out = []
    for k, leaf in zip(keys, flat):
        if isinstance(leaf, lj.LoraWeight):
            b = (jax.random.normal(k, leaf.b.shape, jnp.float32) * scale).astype(leaf.b.dtype)
            leaf = dataclasses.replace(leaf, b=b)
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def tx_update(tx, grads, state, params=None):
    """optax's own code (Adam's ``decay ** count``) relies on standard promotion;
    only the optimizer runs outside the strict mode the rest of the test keeps."""
    with jax.numpy_dtype_promotion("standard"):
        return tx.update(grads, state, params)


def close(a, b, tol):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float(np.max(np.abs(a - b))) if a.size else 0.0
    ref = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
    assert err <= tol * ref, f"max abs diff {err} > {tol} * {ref}"


def check_lora_matches_merged(fn, params, args, *, key, targets=None, rank=2, layout=None,
                              tol=1e-5, grad_tol=1e-4, jit=True, mode="rev"):
    """The core contract, for any fn(params, *args) -> array.

    1. B = 0: lora(fn) is bit-equal to fn on the base.
    2. random B: lora(fn)(p) == fn(merge(p)), eager and jitted.
    3. gradients w.r.t. A and B equal those through the merged form.
    """
    k1, k2 = jax.random.split(key)
    lp = lj.lorafy(params, rank=rank, targets=targets, key=k1, layout=layout)
    f = lj.lora(fn)
    base = fn(params, *args)
    zero = f(lp, *args)
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(base))

    lp = randomize_b(lp, k2)
    ref = fn(lj.merge(lp), *args)
    close(f(lp, *args), ref, tol)
    if jit:
        close(jax.jit(f)(lp, *args), ref, tol)

    trainable, frozen = lj.split(lp)

    def loss_lora(tr):
        return jnp.sum(jnp.sin(f(lj.combine(tr, frozen), *args).astype(jnp.float32)))

    def loss_merged(tr):
        return jnp.sum(jnp.sin(fn(lj.merge(lj.combine(tr, frozen)), *args).astype(jnp.float32)))

    if mode == "fwd":   # while_loop: forward-mode only
        tangent = jax.tree.map(jnp.ones_like, trainable)
        _, t1 = jax.jvp(loss_lora, (trainable,), (tangent,))
        _, t2 = jax.jvp(loss_merged, (trainable,), (tangent,))
        close(t1, t2, grad_tol)
        return lp
    g = jax.grad(loss_lora)(trainable)
    g_ref = jax.grad(loss_merged)(trainable)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        close(x, y, grad_tol)
    if jit:
        g_jit = jax.jit(jax.grad(loss_lora))(trainable)
        for x, y in zip(jax.tree.leaves(g_jit), jax.tree.leaves(g_ref)):
            close(x, y, grad_tol)
    return lp


def random_hf_llama(torch, transformers):
    """A small odd-sized GQA transformers Llama with N(0, 0.3) weights (seeded), in eval mode."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=35, intermediate_size=33,
                                   num_hidden_layers=2, num_attention_heads=5,
                                   num_key_value_heads=1, head_dim=6, max_position_embeddings=64,
                                   rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    return hf
