"""Training contract: only A/B train, optimizer state is adapter-sized, FLOPs drop."""

import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from helpers import randomize_b, tx_update


class MLP(nn.Module):
    width: int = 512
    depth: int = 4
    out: int = 11

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = jax.nn.gelu(nn.Dense(self.width)(x))
        return nn.Dense(self.out)(x)


def _setup(key, width=13, depth=3, batch=7, rank=3):
    m = MLP(width=width, depth=depth)
    x = jax.random.normal(key, (batch, width))
    y = jax.random.randint(key, (batch,), 0, 11)
    params = m.init(key, x)["params"]
    lp = lj.lorafy(params, rank=rank, key=key)
    apply = lj.lora(lambda p, x: m.apply({"params": p}, x))

    def loss(p, x, y):
        logits = apply(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return m, params, lp, loss, x, y


@pytest.mark.parametrize("kind", ["masked", "lora_optimizer"])
def test_masked_optimizer_state_and_frozen_leaves(key, kind):
    _, params, lp, loss, x, y = _setup(key)
    if kind == "masked":      # optax.masked passes frozen grads through: zero them explicitly
        mask = lj.trainable_mask(lp)
        frozen_mask = jax.tree.map(lambda m: not m, mask)
        tx = optax.chain(optax.masked(optax.adam(1e-2), mask),
                         optax.masked(optax.set_to_zero(), frozen_mask))
    else:
        tx = lj.lora_optimizer(optax.adam(1e-2), lp)
    state = tx.init(lp)
    n_trainable = lj.count_params(lp)["trainable"]
    floats = [v for v in jax.tree.leaves(state)
              if getattr(v, "dtype", None) is not None and jnp.issubdtype(v.dtype, jnp.floating)]
    n_state = sum(int(np.size(v)) for v in floats)
    assert n_state == 2 * n_trainable          # Adam's mu and nu for A and B, nothing else

    @jax.jit
    def step(p, s):
        l, g = jax.value_and_grad(loss)(p, x, y)
        u, s = tx_update(tx, g, s, p)
        return optax.apply_updates(p, u), s, l

    p, losses = lp, []
    for _ in range(10):
        p, state, l = step(p, state)
        losses.append(float(l))
    assert losses[-1] < losses[0]
    _, frozen0 = lj.split(lp)
    trained, frozen1 = lj.split(p)
    for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(np.any(np.asarray(l.b)) for l in jax.tree.leaves(
        trained, is_leaf=lambda n: isinstance(n, lj.LoraWeight)) if isinstance(l, lj.LoraWeight))


def test_split_combine_train_loop_loss_falls(key):
    _, _, lp, loss, x, y = _setup(key)
    trainable, frozen = lj.split(lp)
    tx = optax.adam(3e-2)
    state = tx.init(trainable)
    n_state = sum(int(np.size(l)) for l in jax.tree.leaves(state) if np.ndim(l) > 0)
    assert n_state == 2 * lj.count_params(lp)["trainable"]

    @jax.jit
    def step(tr, s):
        l, g = jax.value_and_grad(lambda t: loss(lj.combine(t, frozen), x, y))(tr)
        u, s = tx_update(tx, g, s, tr)
        return optax.apply_updates(tr, u), s, l

    losses = []
    for _ in range(20):
        trainable, state, l = step(trainable, state)
        losses.append(float(l))
    assert losses[-1] < 0.5 * losses[0]


def _flops(compiled):
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0]
    return float(ca["flops"])


def test_lora_step_flops_and_no_weight_gradient(key):
    width, batch = 512, 64
    m, params, lp, loss, x, y = _setup(key, width=width, depth=4, batch=batch, rank=8)
    trainable, frozen = lj.split(lp)

    def lora_step(tr, fr, x, y):
        g = jax.grad(lambda t: loss(lj.combine(t, fr), x, y))(tr)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, tr, g)

    def full_step(p, x, y):
        def full_loss(p):
            logits = m.apply({"params": p}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        g = jax.grad(full_loss)(p)
        return jax.tree.map(lambda p, g: p - 1e-3 * g, p, g)

    c_lora = jax.jit(lora_step).lower(trainable, frozen, x, y).compile()
    c_full = jax.jit(full_step).lower(params, x, y).compile()
    ratio = _flops(c_lora) / _flops(c_full)
    assert ratio <= 0.70, ratio
    # No [512, 512] product anywhere: neither dW0 nor A@B is ever formed.
    hlo = c_lora.as_text()
    product = re.compile(r"= f32\[512,512\]\{[0-9,]*\} (dot|convolution)\(")
    big = [line for line in hlo.splitlines() if product.search(line)]
    assert not big, big[:3]
    assert product.search(c_full.as_text())


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(rank=0), ValueError, "rank must be a positive int"),
    (dict(rank=-2), ValueError, "rank must be a positive int"),
    (dict(rank=2.5), ValueError, "rank must be a positive int"),
    (dict(rank=2, alpha=0), ValueError, "alpha must be a positive finite number"),
    (dict(rank=2, alpha=-1.0), ValueError, "alpha must be a positive finite number"),
    (dict(rank=2, alpha=float("inf")), ValueError, "alpha must be a positive finite number"),
    (dict(rank=2, alpha_pattern={"dense": float("nan")}), ValueError, "alpha_pattern gives leaf"),
    (dict(rank=2, rank_pattern={"dense": 1.5}), ValueError, "rank_pattern gives leaf"),
    (dict(rank=2, dtype=jnp.int32), ValueError, "dtype must be a floating dtype"),
    (dict(rank=2, targets="nothing_here"), ValueError,
     r"target 'nothing_here' matches no leaf; the tree holds 'dense/bias' \(7,\)"),
    (dict(rank=2, targets=["kernel", "nope"]), ValueError, "'nope' matches no leaf"),
    (dict(rank=2, targets=lambda p, l: False), ValueError, "predicate matched no leaf"),
    (dict(rank=1, targets="step"), ValueError, "leaf 'step' has dtype int32"),
    (dict(rank=1, targets="name"), TypeError, "leaf 'name' is a str, not an array"),
    (dict(rank=1, targets="bias"), ValueError, "leaf 'dense/bias' has shape"),
    (dict(rank=2, init="xavier"), ValueError, "unknown init 'xavier'"),
    (dict(rank=2, layout={"dense": (0, 2)}), ValueError, "layout for leaf 'dense/kernel'"),
])
def test_bad_input(kwargs, exc, match):
    params = {"dense": {"kernel": jnp.ones((5, 7)), "bias": jnp.ones(7)},
              "step": jnp.int32(3), "name": "mlp"}
    with pytest.raises(exc, match=match):
        lj.lorafy(params, **kwargs)


@pytest.mark.parametrize("kwargs,rank", [(dict(rank=6), 6),
                                         (dict(rank=2, rank_pattern={"dense": 9}), 9)])
def test_rank_above_min_in_out_warns_once(kwargs, rank):
    params = {"dense": {"kernel": jnp.ones((5, 7)), "bias": jnp.ones(7)}}
    match = rf"rank {rank} exceeds min\(in, out\) of \['dense/kernel'\]"
    with pytest.warns(lj.RankWarning, match=match) as rec:
        w = lj.lorafy(params, targets="dense/kernel", **kwargs)["dense"]["kernel"]
    assert len(rec) == 1 and w.a.shape == (5, rank) and w.b.shape == (rank, 7)
    assert "guessed from names" in str(rec[0].message)          # no fn: the guess may be why


def test_rank_warning_of_a_guessed_stack_points_at_fn():
    """A 3-D einsum kernel [D, H, Dh] guessed as a stack of H x Dh matrices looks too small
    for rank 3; with fn the layout is read off the einsum and nothing is too small."""
    params = {"attn": {"k_proj": {"w": jnp.ones((7, 2, 5))}}}
    fn = lambda p, x: jnp.einsum("bd,dhk->bhk", x, p["attn"]["k_proj"]["w"])   # noqa: E731
    with pytest.warns(lj.RankWarning, match=r"rank 3 exceeds.*guessed from names.*pass fn="):
        lj.lorafy(params, rank=3, targets="k_proj")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = lj.lorafy(params, rank=3, fn=fn, args=(jnp.ones((2, 7)),))["attn"]["k_proj"]["w"]
    assert w.a.shape == (7, 3) and w.b.shape == (3, 2, 5)


def test_lora_rejects_non_callable():
    with pytest.raises(TypeError, match="fn must be callable"):
        lj.lora(3)


def test_merge_and_count(key):
    p = {"a": {"kernel": jax.random.normal(key, (3, 5, 7))}, "b": {"bias": jnp.ones(7)}}
    lp = randomize_b(lj.lorafy(p, rank=2, key=key), key)
    w = lp["a"]["kernel"]
    manual = w.w0 + w.scale * jnp.einsum("lir,lro->lio", w.a, w.b)
    np.testing.assert_allclose(lj.merge(lp)["a"]["kernel"], manual, rtol=1e-6, atol=1e-6)
    c = lj.count_params(lp)
    assert c["trainable"] == 3 * (5 * 2 + 2 * 7) and c["frozen"] == 3 * 5 * 7 + 7


def test_merge_forms_every_node_quantized_ones_too(key):
    params = {"a": {"kernel": jax.random.normal(key, (64, 33))}, "b": {"kernel": jnp.ones((5, 7))}}
    mixed = lj.lorafy(lj.quantize(params, "nf4", targets="a/kernel"), rank=2, targets="b/kernel")
    merged = lj.merge(mixed)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))
    np.testing.assert_array_equal(merged["a"]["kernel"], lj.dequantize(mixed)["a"]["kernel"])
