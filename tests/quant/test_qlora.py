"""QLoRA = lorafy(quantize(params)): the base is dequantized inside jit, only A/B train."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from helpers import Stack, check_lora_matches_merged, close, randomize_b, tx_update


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int4"])
def test_qlora_matches_merged_dequantized(key, kind):
    x = jax.random.normal(key, (2, 4, 5))
    m = Stack()
    params = m.init(key, x)["params"]
    q = lj.quantize(params, kind, targets="kernel", block_size=32, group_size=5)
    assert isinstance(q["layers"]["up"]["kernel"], lj.QuantizedWeight)
    fn = lambda p, x: m.apply({"params": p}, x)
    # base = the dequantized model; B = 0 gives it bit for bit, random B matches merge()
    check_lora_matches_merged(lambda p, x: lj.lora(fn)(p, x), q, (x,), key=key, targets="kernel")
    lp = lj.lorafy(q, rank=2, targets="kernel")
    lj.lora(fn, strict=True)(lp, x)      # no LoraWeight formed densely
    close(lj.lora(fn)(q, x), fn(lj.dequantize(q), x), 1e-6)


def test_qlora_training_frozen_codes(key):
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = jax.nn.gelu(nn.Dense(64)(x))
            h = jax.nn.gelu(nn.Dense(64)(h))
            return nn.Dense(3)(h)

    m = Net()
    x = jax.random.normal(key, (64, 17))
    y = jnp.argmax(x @ jax.random.normal(jax.random.key(1), (17, 3)), axis=-1)
    params = m.init(key, x)["params"]
    qp = lj.lorafy(lj.quantize(params, "nf4", targets=r"Dense_[01]/kernel"), rank=4,
                   targets=r"Dense_[01]/kernel", key=key)
    trainable, frozen = lj.split(qp)
    apply = lj.lora(m.apply)
    tx = optax.adam(1e-2)
    state = tx.init(trainable)

    def loss(tr):
        logits = apply({"params": lj.combine(tr, frozen)}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(tr, s):
        l, g = jax.value_and_grad(loss)(tr)
        u, s = tx_update(tx, g, s, tr)
        return optax.apply_updates(tr, u), s, l

    losses = []
    for _ in range(30):
        trainable, state, l = step(trainable, state)
        losses.append(float(l))
    assert losses[-1] < 0.5 * losses[0]
    after = lj.combine(trainable, frozen)
    for a, b in zip(jax.tree.leaves(qp["Dense_0"]["kernel"].w0),
                    jax.tree.leaves(after["Dense_0"]["kernel"].w0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # gradients exist for A and B only: the trainable tree has nothing else
    kinds = {type(l).__name__ for l in jax.tree.leaves(trainable)}
    assert kinds == {"ArrayImpl"} and len(jax.tree.leaves(trainable)) == 4


def test_dequantize_happens_inside_jit(key):
    p = {"kernel": jax.random.normal(key, (128, 96))}
    lp = randomize_b(lj.lorafy(lj.quantize(p, "nf4"), rank=4), key)
    x = jax.random.normal(key, (3, 128))
    f = jax.jit(lj.lora(lambda p, x: x @ p["kernel"]))
    compiled = f.lower(lp, x).compile()
    args = compiled.memory_analysis().argument_size_in_bytes
    dense = 128 * 96 * 4
    assert args < dense / 4                  # the f32 base never crosses the jit boundary
    close(f(lp, x), x @ lj.merge(lp)["kernel"], 1e-5)
    text = compiled.as_text()
    assert "u8[" in text                      # packed codes are unpacked in the program
