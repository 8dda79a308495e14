"""PEFT parity for training: fully trained leaves (modules_to_save), lora_dropout,
rank > min(in, out), and init_lora_weights (False, "orthogonal", embedding init).

Each test names the PEFT (or lorax) test whose behaviour it re-expresses.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from helpers import close

D_IN, D_OUT, N = 7, 5, 11


def _params(key=0):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    return {"dense": {"kernel": jax.random.normal(k1, (D_IN, D_OUT)),
                      "bias": jnp.zeros(D_OUT)},
            "head": {"kernel": jax.random.normal(k2, (D_OUT, 3))},
            "norm": {"scale": 1.0 + 0.1 * jax.random.normal(k3, (D_OUT,))}}


def _apply(p, x):
    h = x @ p["dense"]["kernel"] + p["dense"]["bias"][None]
    return (h * p["norm"]["scale"][None]) @ p["head"]["kernel"]


def _x(key=1, shape=(N, D_IN)):
    return jax.random.normal(jax.random.key(key), shape)


# ---------------------------------------------------------------- modules_to_save


# PEFT tests/test_other.py::TestModulesToSaveAttributeAccess, lorax's fully-trainable
# leaves: the head and the norm train next to A/B, everything else stays frozen.
def test_trainable_leaves_train_next_to_the_adapter():
    p = _params()
    lp = lj.lorafy(p, rank=2, targets="dense/kernel", trainable=["head", "norm/scale"],
                   init=False)
    assert isinstance(lp["head"]["kernel"], lj.Trainable)
    assert isinstance(lp["norm"]["scale"], lj.Trainable)
    trainable, frozen = lj.split(lp)
    assert trainable["head"]["kernel"].value.shape == (D_OUT, 3)
    assert frozen["head"]["kernel"].value is None and trainable["dense"]["bias"] is None
    assert lj.trainable_mask(lp)["norm"]["scale"].value is True
    counts = lj.count_params(lp)
    assert counts["trainable"] == 2 * (D_IN + D_OUT) + D_OUT * 3 + D_OUT
    f = lj.lora(_apply, strict=True)
    x, y = _x(), jnp.ones((N, 3))
    close(f(lp, x), _apply(lj.merge(lp), x), 1e-5)

    tx = lj.lora_optimizer(optax.sgd(0.1), lp)
    state = tx.init(lp)
    g = jax.grad(lambda q: jnp.mean((f(q, x) - y) ** 2))(lp)
    upd, _ = tx.update(g, state, lp)
    new = optax.apply_updates(lp, upd)
    assert not np.allclose(new["head"]["kernel"].value, lp["head"]["kernel"].value)
    assert not np.allclose(new["norm"]["scale"].value, lp["norm"]["scale"].value)
    np.testing.assert_array_equal(new["dense"]["kernel"].w0, p["dense"]["kernel"])
    np.testing.assert_array_equal(new["dense"]["bias"], p["dense"]["bias"])
    # The gradient of the head is the dense one: sgd moved it by exactly -0.1 * grad.
    close(new["head"]["kernel"].value, lp["head"]["kernel"].value - 0.1 * g["head"]["kernel"].value,
          1e-6)


# PEFT's inject_adapter skips a module that is in modules_to_save when it applies LoRA.
def test_default_targets_leave_trainable_leaves_alone_and_overlap_is_refused():
    p = _params()
    lp = lj.lorafy(p, rank=2, trainable="head")
    assert isinstance(lp["dense"]["kernel"], lj.LoraWeight)
    assert isinstance(lp["head"]["kernel"], lj.Trainable)
    with pytest.raises(ValueError, match="leaf 'head/kernel' is both a LoRA target and trainable"):
        lj.lorafy(p, rank=2, targets="kernel", trainable="head")
    with pytest.raises(ValueError, match="trainable leaf 'x' is int32"):
        lj.mark_trainable({"x": jnp.int32(3), "w": jnp.ones((5, 7))}, "x")
    with pytest.raises(ValueError, match="target 'nope' matches no leaf"):
        lj.lorafy(p, rank=2, trainable="nope")
    with pytest.raises(ValueError, match="mark_trainable: targets is None"):
        lj.mark_trainable(p, None)
    only = lj.mark_trainable(p, "norm")       # full fine-tuning of chosen leaves alone
    assert lj.count_params(only)["trainable"] == D_OUT
    t, f = lj.split(only)
    assert lj.combine(t, f)["norm"]["scale"].value is only["norm"]["scale"].value


def test_trainable_leaves_are_unwrapped_under_jit_scan_and_vmap():
    p = {"w": jax.random.normal(jax.random.key(3), (4, D_IN, D_IN)), "s": jnp.ones((4, D_IN))}
    lp = lj.lorafy(p, rank=2, targets="w", trainable="s", init=False)

    def run(q, x):
        def body(h, layer):
            w, s = layer
            return (h @ w) * s[None], None
        return jax.lax.scan(body, x, (q["w"], q["s"]))[0]

    want = run(lj.merge(lp), _x(shape=(3, D_IN)))
    got = jax.jit(lj.lora(run, strict=True))(lp, _x(shape=(3, D_IN)))
    close(got, want, 1e-4)
    batched = jax.vmap(lj.lora(run, strict=True), in_axes=(None, 0))(lp, _x(shape=(2, 3, D_IN)))
    close(batched[0], run(lj.merge(lp), _x(shape=(2, 3, D_IN))[0]), 1e-4)


# ---------------------------------------------------------------- lora_dropout


def _dropout_case():
    p = {"w": jax.random.normal(jax.random.key(4), (D_IN, D_OUT))}
    lp = lj.lorafy(p, rank=3, targets="w", init=False, key=jax.random.key(5))
    return lp["w"], _x()


def _by_hand(w, x, key, rate, k=0):
    """PEFT's lora_B(lora_A(dropout(x))) * scaling + base(x), the mask drawn by hand."""
    keep = jax.random.bernoulli(jax.random.fold_in(key, k), 1.0 - rate, x.shape)
    xd = jnp.where(keep, x / jnp.float32(1.0 - rate), jnp.float32(0.0))
    return x @ w.w0 + w.scale * ((xd @ w.a) @ w.b), keep


# PEFT tests/test_custom_models.py::test_lora_dropout (eval has no dropout; train does)
def test_dropout_is_off_in_eval_and_matches_a_hand_written_mask_in_train():
    w, x = _dropout_case()
    plain = lj.lora(lambda w, x: x @ w)
    drop = lj.lora(lambda w, x: x @ w, dropout=0.3)
    np.testing.assert_array_equal(drop(w, x), plain(w, x))       # eval: exactly no dropout
    key = jax.random.key(7)
    y = drop(w, x, dropout_key=key)
    want, keep = _by_hand(w, x, key, 0.3)
    assert 0.5 < float(keep.mean()) < 0.9 and not bool(keep.all())
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    wrong, _ = _by_hand(w, x, jax.random.key(8), 0.3)
    assert float(jnp.abs(y - wrong).max()) > 1e-2                 # another mask is visible
    # The base path never drops: with B = 0 dropout changes nothing.
    zero_b = lj.LoraWeight(w.w0, w.a, jnp.zeros_like(w.b), alpha=w.alpha)
    np.testing.assert_array_equal(drop(zero_b, x, dropout_key=key), plain(zero_b, x))


def test_dropout_also_drops_the_input_of_a_transposed_use():
    """``x @ w.T`` (a tied embedding's attend, or an (out, in) weight): the adapter input is
    x there too, and dropout applies to it, with the same mask as the plain use."""
    w, x = _dropout_case()
    wt = lj.LoraWeight(w.w0.T, w.b.T, w.a.T, alpha=w.alpha, in_axes=(0,))   # [out, in], guessed
    key = jax.random.key(7)
    with pytest.warns(lj.MaterializationWarning, match=r"x @ W\.T"):   # A on the output side
        y = lj.lora(lambda w, x: x @ w.T, dropout=0.3)(wt, x, dropout_key=key)
    np.testing.assert_allclose(y, _by_hand(w, x, key, 0.3)[0], rtol=1e-6, atol=1e-6)


def test_dropout_under_jit_equals_eager_and_gradients_flow():
    w, x = _dropout_case()
    drop = lj.lora(lambda w, x: x @ w, dropout=0.25)
    key = jax.random.key(9)
    np.testing.assert_allclose(jax.jit(drop)(w, x, dropout_key=key), drop(w, x, dropout_key=key),
                               rtol=1e-6, atol=1e-6)
    t, f = lj.split({"w": w})

    def loss(t, key):
        return jnp.sum(drop(lj.combine(t, f)["w"], x, dropout_key=key) ** 2)

    g = jax.grad(loss)(t, key)["w"]
    _, keep = _by_hand(w, x, key, 0.25)
    xd = jnp.where(keep, x / jnp.float32(0.75), jnp.float32(0.0))
    dy = 2 * _by_hand(w, x, key, 0.25)[0]
    close(g.a, w.scale * xd.T @ (dy @ w.b.T), 1e-4)                # d/dA sees dropout(x)
    close(g.b, w.scale * (xd @ w.a).T @ dy, 1e-4)
    assert not jnp.allclose(g.a, jax.grad(loss)(t, jax.random.key(10))["w"].a)


def test_dropout_keeps_the_factored_path_and_draws_per_scan_iteration():
    w, x = _dropout_case()
    hlo = jax.jit(lj.lora(lambda w, x: x @ w, dropout=0.1)).lower(
        w, x, dropout_key=jax.random.key(0)).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 3                                      # x@W0, x@A, (xA)@B
    assert not any(line.rstrip().endswith(f"tensor<{D_IN}x{D_OUT}xf32>") for line in dots)

    stack = lj.lorafy({"w": jax.random.normal(jax.random.key(2), (3, D_IN, D_IN))}, rank=2,
                      targets="w", init=False)
    f = lj.lora(lambda q, h: jax.lax.scan(lambda h, wl: (h @ wl, None), h, q["w"])[0],
                dropout=0.5)
    k = jax.random.key(11)
    keys = jax.random.split(jax.random.fold_in(k, 0), 3)   # one key per iteration
    h = x
    for i in range(3):
        wl = jax.tree.map(lambda v, i=i: v[i], stack["w"])
        keep = jax.random.bernoulli(jax.random.fold_in(keys[i], 0), 0.5, h.shape)
        hd = jnp.where(keep, h / jnp.float32(0.5), jnp.float32(0.0))
        h = h @ wl.w0 + wl.scale * ((hd @ wl.a) @ wl.b)
    close(f(stack, x, dropout_key=k), h, 1e-4)


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.1"])
def test_bad_dropout_is_refused(bad):
    with pytest.raises(ValueError, match="lora: dropout must be a number in"):
        lj.lora(lambda w, x: x @ w, dropout=bad)
    w, x = _dropout_case()
    with pytest.raises(TypeError, match="dropout_key"):
        lj.lora(lambda w, x: x @ w, dropout=0.1)(w, x, dropout_key=3)


# ---------------------------------------------------------------- rank > min(in, out)


# PEFT tests/test_custom_models.py TEST_CASES: ("Vanilla MLP 1 LoRA", "MLP",
# LoraConfig, {"target_modules": ["lin0"]}) with r=8 on MLP.lin1 = nn.Linear(20, 2).
def test_rank_above_min_in_out_is_accepted_with_one_warning():
    k1, k2 = jax.random.split(jax.random.key(12))
    p = {"lin1": {"weight": jax.random.normal(k1, (2, 20))},      # torch (out, in)
         "lin0": {"weight": jax.random.normal(k2, (20, 10))}}

    def mlp(p, x):
        return jax.nn.relu(x @ p["lin0"]["weight"].T) @ p["lin1"]["weight"].T

    x = _x(shape=(N, 10))
    match = r"rank 8 exceeds min\(in, out\) of \['lin1/weight'\]"
    with pytest.warns(lj.RankWarning, match=match) as rec:
        lp = lj.lorafy(p, rank=8, fn=mlp, args=(x,), init=False, key=jax.random.key(1))
    assert len(rec) == 1
    w = lp["lin1"]["weight"]
    assert w.a.shape == (20, 8) and w.b.shape == (8, 2)
    close(lj.lora(mlp, strict=True)(lp, x), mlp(lj.merge(lp), x), 1e-4)
    delta = lj.merge(lp)["lin1"]["weight"] - p["lin1"]["weight"]
    assert np.linalg.matrix_rank(np.asarray(delta), tol=1e-5) == 2   # at most min(in, out)


# ---------------------------------------------------------------- init_lora_weights


# PEFT tests/test_initialization.py::TestLoraInitialization::test_lora_linear_false
def test_init_false_draws_both_factors_as_peft_leaves_them():
    p = {"w": jnp.zeros((400, 300))}
    w = lj.lorafy(p, rank=50, targets="w", init=False, key=jax.random.key(0))["w"]
    a, b = np.asarray(w.a), np.asarray(w.b)
    assert np.abs(a).max() <= 1 / math.sqrt(400) and np.abs(b).max() <= 1 / math.sqrt(50)
    # Uniform: the variance of U(-c, c) is c^2 / 3.
    assert abs(a.var() - 1 / 400 / 3) < 0.05 / 400 and abs(b.var() - 1 / 50 / 3) < 0.05 / 50
    assert np.abs(a @ b).max() > 0                         # B != 0: the model moves at step 0
    same = lj.lorafy(p, rank=50, targets="w", init=True, key=jax.random.key(0))["w"]
    np.testing.assert_array_equal(same.a, a)               # True is PEFT's default init
    assert not np.asarray(same.b).any()


# PEFT tests/test_initialization.py::TestLoraInitialization::test_lora_orthogonal_init
def test_orthogonal_init_is_nonzero_with_a_zero_product():
    p = {"w": jnp.ones((3, 11, 13))}
    w = lj.lorafy(p, rank=6, targets="w", init="orthogonal", key=jax.random.key(2))["w"]
    assert w.a.shape == (3, 11, 6) and w.b.shape == (3, 6, 13)
    a, b = np.asarray(w.a, np.float64), np.asarray(w.b, np.float64)
    assert np.abs(a).max() > 1e-2 and np.abs(b).max() > 1e-2
    np.testing.assert_allclose(a @ b, 0.0, atol=1e-6)       # starts at the base model
    for i in range(3):
        # A = G_in @ Q_odd / 10, B = Q_even^T @ G_out / 10: each of rank r/2, and
        # the row space of A^T is orthogonal to the column space of B.
        assert np.linalg.matrix_rank(a[i], tol=1e-6) == 3
        assert np.linalg.matrix_rank(b[i], tol=1e-6) == 3
        qa = np.linalg.svd(a[i].T)[0][:, :3]
        qb = np.linalg.svd(b[i])[0][:, :3]
        np.testing.assert_allclose(qa.T @ qa + qb.T @ qb, 2 * np.eye(3), atol=1e-6)
        np.testing.assert_allclose(qa.T @ qb, 0.0, atol=1e-6)
    assert not np.allclose(a[0], a[1])                       # each layer drawn on its own
    with pytest.raises(ValueError, match="init=\"orthogonal\" needs an even rank"):
        lj.lorafy(p, rank=5, targets="w", init="orthogonal")


# PEFT tests/test_initialization.py::TestLoraInitialization::test_lora_embedding_default
# (lora_embedding_A zeros, lora_embedding_B normal) and ..._embedding_false (both normal)
@pytest.mark.parametrize("init", ["kaiming", "gaussian", "orthogonal", False])
def test_embedding_init_matches_peft(init):
    vocab, dim = 301, 40
    p = {"embed": {"embedding": jnp.ones((vocab, dim))}}
    ids = jnp.arange(5)

    def f(p, ids):
        return jnp.take(p["embed"]["embedding"], ids, axis=0)

    w = lj.lorafy(p, rank=4, targets="embedding", init=init, fn=f, args=(ids,),
                  key=jax.random.key(3))["embed"]["embedding"]
    assert w.in_axes == (0,) and w.a.shape == (vocab, 4) and w.b.shape == (4, dim)
    a, b = np.asarray(w.a), np.asarray(w.b)
    assert abs(b.std() - 1.0) < 0.2 and abs(b.mean()) < 0.3       # N(0, 1), not a small bound
    if init is False:
        assert abs(a.std() - 1.0) < 0.1
    else:
        assert not a.any()                                        # vocabulary side zero
        close(lj.lora(f)(({"embed": {"embedding": w}}), ids), f(p, ids), 0)
    guessed = lj.lorafy(p, rank=4, targets="embedding")["embed"]["embedding"]   # no fn
    assert not np.asarray(guessed.a).any() and np.asarray(guessed.b).any()


@pytest.mark.parametrize("init", ["xavier", 1, None, "True"])
def test_unknown_init_is_refused(init):
    with pytest.raises(ValueError, match="unknown init"):
        lj.lorafy({"w": jnp.ones((5, 7))}, rank=2, targets="w", init=init)
