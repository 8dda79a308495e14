"""Merging: TIES / DARE / magnitude-prune combination types (vs PEFT's merge_utils), safe_merge,
PiSSA/OLoRA -> plain LoRA conversion, randomized-SVD PiSSA (PEFT ``pissa_niter_K``).

Peer tests re-expressed: PEFT tests/test_custom_models.py ``test_add_weighted_adapter_*``
(ties, dare_linear, dare_ties, magnitude_prune and their _svd forms), tests/test_initialization.py
``TestPiSSA`` / ``TestOLoRA`` (``pissa_niter_16``, ``path_initial_model_for_weight_conversion``)
and ``test_safe_merge`` (a NaN adapter refused)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from helpers import close
from lora_jax.variants.task_merge import merge_task_tensors

DENSE = ("ties", "magnitude_prune", "dare_linear", "dare_ties")


def _tasks(n=3, shape=(7, 5), seed=0):
    return jax.random.normal(jax.random.key(seed), (n, 1, *shape))      # [n, P=1, ...]


# ----------------------------------------------------------------------------- merge_utils oracle

@pytest.mark.parametrize("method", ["linear", *DENSE])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_task_merge_matches_peft_merge_utils(monkeypatch, method, sign):
    torch = pytest.importorskip("torch")
    mu = pytest.importorskip("peft.utils.merge_utils")
    t = _tasks()
    w = jnp.asarray([0.7, -1.3, 0.4])
    density, key = 0.4, jax.random.key(5)
    masks = jnp.stack([jax.random.bernoulli(k, density, t.shape[1:])
                       for k in jax.random.split(key, 3)])
    draws = iter(torch.tensor(np.asarray(m[0], np.float32)) for m in masks)
    monkeypatch.setattr(torch, "bernoulli", lambda p: next(draws))   # PEFT draws our masks
    tt = [torch.tensor(np.asarray(x[0])) for x in t]
    tw = torch.tensor(np.asarray(w))
    if method == "linear":
        ref = mu.task_arithmetic(tt, tw)
    elif method in ("ties", "dare_ties"):
        ref = getattr(mu, method)(tt, tw, density, sign)
    else:
        ref = getattr(mu, method)(tt, tw, density)
    ours = merge_task_tensors(t, w, method, density=density, majority_sign_method=sign, key=key)
    np.testing.assert_allclose(np.asarray(ours[0]), ref.numpy(), rtol=1e-6, atol=1e-6)


def test_task_merge_by_hand():
    t = jnp.asarray([[[1.0, -2.0, 3.0, -0.5]], [[-4.0, 1.0, 2.0, 0.25]]])
    w = jnp.asarray([1.0, 0.5])
    # magnitude_prune at 0.5 keeps 2 of 4 per tensor: [., -2, 3, .], [-4, ., 2, .]
    np.testing.assert_array_equal(
        merge_task_tensors(t, w, "magnitude_prune", density=0.5)[0], [-2.0, -2.0, 4.0, 0.0])
    # ties (total): pruned sums [-4, -2, 5, 0] -> signs [-, -, +, +(0)]; the kept agreeing
    # weighted values are averaged: [-2/1, -2/1, (3+1)/2, 0/max(0,1)]
    np.testing.assert_array_equal(
        merge_task_tensors(t, w, "ties", density=0.5)[0], [-2.0, -2.0, 2.0, 0.0])
    # density 1 prunes nothing: DARE linear is plain task arithmetic
    np.testing.assert_allclose(
        merge_task_tensors(t, w, "dare_linear", density=1.0)[0], [-1.0, -1.5, 4.0, -0.375])
    # a given mask: kept / density
    m = jnp.asarray([[[1, 0, 1, 0]], [[0, 1, 1, 1]]])
    np.testing.assert_allclose(
        merge_task_tensors(t, w, "dare_linear", density=0.5, masks=m)[0],
        [2.0, 1.0, 8.0, 0.25])


# ----------------------------------------------------------------------------- add_weighted_adapter

def _two_adapters(rank=3, shape=(11, 7)):
    w = jax.random.normal(jax.random.key(0), shape)
    out = {}
    for i, name in enumerate(("x", "y")):
        ka, kb = jax.random.split(jax.random.key(10 + i))
        p = lj.lorafy({"kernel": w}, rank=rank, alpha=2.0 * (i + 1))
        node = dataclasses.replace(p["kernel"], a=jax.random.normal(ka, (shape[0], rank)),
                                   b=jax.random.normal(kb, (rank, shape[1])))
        out[name] = {"kernel": node}
    return out


@pytest.mark.parametrize("ctype", ["ties", "magnitude_prune"])
def test_add_weighted_adapter_ties_prune_match_peft(ctype):
    torch = pytest.importorskip("torch")
    mu = pytest.importorskip("peft.utils.merge_utils")
    ad = _two_adapters()
    ws = [0.8, -0.6]
    got = lj.add_weighted_adapter(ad, ws, combination_type=ctype, density=0.5)["kernel"]
    assert got.scale == 1.0 and got.rank == 3
    # PEFT's _generalized_task_arithmetic_weighted_adapter on its (r, in) / (out, r) factors
    ws_s = [w * ad[n]["kernel"].scale for w, n in zip(ws, ad)]
    wa = torch.tensor([np.sign(v) * np.sqrt(abs(v)) for v in ws_s], dtype=torch.float32)
    wb = torch.tensor([np.sqrt(abs(v)) for v in ws_s], dtype=torch.float32)
    fa = [torch.tensor(np.asarray(ad[n]["kernel"].a).T.copy()) for n in ad]
    fb = [torch.tensor(np.asarray(ad[n]["kernel"].b).T.copy()) for n in ad]
    fn = (lambda t, w: mu.ties(t, w, 0.5, "total")) if ctype == "ties" else \
        (lambda t, w: mu.magnitude_prune(t, w, 0.5))
    np.testing.assert_allclose(np.asarray(got.a), fn(fa, wa).numpy().T, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got.b), fn(fb, wb).numpy().T, atol=1e-6)


def test_add_weighted_adapter_dare_uses_key_per_leaf_and_factor():
    ad = _two_adapters()
    ws = [0.8, -0.6]
    key = jax.random.key(3)
    got = lj.add_weighted_adapter(ad, ws, combination_type="dare_linear", density=0.5, key=key)
    again = lj.add_weighted_adapter(ad, ws, combination_type="dare_linear", density=0.5, key=key)
    np.testing.assert_array_equal(got["kernel"].a, again["kernel"].a)
    ka, kb = jax.random.split(jax.random.fold_in(key, 0))   # leaf 0, then A / B
    scaled = [w * ad[n]["kernel"].scale for w, n in zip(ws, ad)]
    for field, k, sign in (("a", ka, True), ("b", kb, False)):
        stack = jnp.stack([getattr(ad[n]["kernel"], field)[None] for n in ad])
        masks = [jax.random.bernoulli(kk, 0.5, stack.shape[1:]) for kk in jax.random.split(k, 2)]
        want = sum((np.sign(v) if sign else 1.0) * np.sqrt(abs(v)) * np.where(m, x, 0.0) / 0.5
                   for v, m, x in zip(scaled, masks, stack))
        np.testing.assert_allclose(np.asarray(getattr(got["kernel"], field)), want[0],
                                   rtol=1e-5, atol=1e-6)
    other = lj.add_weighted_adapter(ad, ws, combination_type="dare_ties", density=0.5,
                                    key=jax.random.key(4))
    assert not np.allclose(other["kernel"].a, got["kernel"].a)


@pytest.mark.parametrize("ctype", ["ties_svd", "magnitude_prune_svd", "dare_linear_svd"])
def test_add_weighted_adapter_svd_forms(ctype):
    ad = _two_adapters(rank=2)
    ws = [1.0, 0.5]
    deltas = jnp.stack([(ad[n]["kernel"].scale * ad[n]["kernel"].a @ ad[n]["kernel"].b)[None]
                        for n in ad])
    key = jax.random.key(8)
    got = lj.add_weighted_adapter(ad, ws, combination_type=ctype, density=0.6, svd_rank=3,
                                  key=key)["kernel"]
    base = ctype.removesuffix("_svd")
    merged = np.asarray(merge_task_tensors(deltas, jnp.asarray(ws), base, density=0.6,
                                           key=jax.random.fold_in(key, 0))[0], np.float64)
    u, s, vh = np.linalg.svd(merged)
    want = (u[:, :3] * s[:3]) @ vh[:3]
    assert got.rank == 3 and got.scale == 1.0
    close(got.a @ got.b, want, 1e-5)


def test_add_weighted_adapter_density_one_is_linear_and_bad_args():
    ad = _two_adapters()
    lin = lj.add_weighted_adapter(ad, [0.5, 0.5], combination_type="linear")["kernel"]
    for ctype in ("magnitude_prune", "dare_linear"):
        got = lj.add_weighted_adapter(ad, [0.5, 0.5], combination_type=ctype, density=1.0)
        np.testing.assert_allclose(got["kernel"].a, lin.a, rtol=1e-6)
        np.testing.assert_allclose(got["kernel"].b, lin.b, rtol=1e-6)
    with pytest.raises(ValueError, match="^add_weighted_adapter: combination_type 'ties' needs "
                                         "density="):
        lj.add_weighted_adapter(ad, [1, 1], combination_type="ties")
    with pytest.raises(ValueError, match="^add_weighted_adapter: 'dare_ties' prunes at random; "
                                         "pass key="):
        lj.add_weighted_adapter(ad, [1, 1], combination_type="dare_ties", density=0.3)
    with pytest.raises(ValueError, match="^add_weighted_adapter: density must be in"):
        lj.add_weighted_adapter(ad, [1, 1], combination_type="ties", density=1.5)
    with pytest.raises(ValueError, match="^add_weighted_adapter: density is only used"):
        lj.add_weighted_adapter(ad, [1, 1], combination_type="cat", density=0.5)
    with pytest.raises(ValueError, match="majority_sign_method"):
        lj.add_weighted_adapter(ad, [1, 1], combination_type="ties", density=0.5,
                                majority_sign_method="mean")
    mixed = {"x": ad["x"], "y": lj.lorafy({"kernel": ad["y"]["kernel"].w0}, rank=2)}
    with pytest.raises(ValueError, match="^add_weighted_adapter: leaf 'kernel': 'ties' needs "
                                         "one rank"):
        lj.add_weighted_adapter(mixed, [1, 1], combination_type="ties", density=0.5)


# ----------------------------------------------------------------------------- safe_merge

def test_safe_merge_refuses_non_finite_and_names_the_leaf():
    ad = _two_adapters()["x"]
    params = {"head": {"kernel": ad["kernel"]}, "bias": jnp.asarray([jnp.nan])}
    merged = lj.safe_merge(params)           # a NaN outside adapted weights is not checked
    np.testing.assert_array_equal(merged["head"]["kernel"], lj.merge(params)["head"]["kernel"])
    bad = dataclasses.replace(ad["kernel"], b=ad["kernel"].b.at[1, 2].set(jnp.inf))
    with pytest.raises(ValueError, match=r"^safe_merge: leaf 'head/kernel' holds 11 non-finite"):
        lj.safe_merge({"head": {"kernel": bad}})
    with pytest.raises(ValueError, match="^safe_merge: params are traced"):
        jax.jit(lj.safe_merge)(params)
    with pytest.raises(TypeError, match="^safe_merge: params must be a parameter pytree"):
        lj.safe_merge("model.safetensors")


# ----------------------------------------------------------------------------- PiSSA / OLoRA

@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_olora_to_lora_applies_to_the_original_base(init, rslora):
    w = jax.random.normal(jax.random.key(2), (2, 11, 7))        # stacked [L, in, out]
    lp = lj.lorafy({"kernel": w}, rank=3, alpha=5.0, rslora=rslora, layout={"kernel": (1, (0,))})
    initial = (lj.pissa_init if init == "pissa" else lj.olora_init)(lp)
    node = initial["kernel"]
    trained = {"kernel": dataclasses.replace(
        node, a=node.a + 0.1 * jax.random.normal(jax.random.key(3), node.a.shape),
        b=node.b - 0.2 * jax.random.normal(jax.random.key(4), node.b.shape))}
    plain = lj.pissa_to_lora(trained, initial)["kernel"]
    assert plain.rank == 6 and plain.scale == pytest.approx(node.scale)
    assert plain.alpha == pytest.approx(5.0 * (2 ** 0.5 if rslora else 2.0))
    close(plain.w0, w, 1e-5)                                    # the ORIGINAL weight
    close(lj.merge({"kernel": plain})["kernel"], lj.merge(trained)["kernel"], 1e-5)
    # the adapter alone is the training update: dW = s (a b - a0 b0)
    np.testing.assert_array_equal(plain.a[..., :3], trained["kernel"].a)
    np.testing.assert_array_equal(plain.b[:, 3:], -node.b)


def test_pissa_to_lora_bad_inputs():
    w = jax.random.normal(jax.random.key(2), (11, 7))
    initial = lj.pissa_init(lj.lorafy({"kernel": w}, rank=3))
    with pytest.raises(ValueError, match="^pissa_to_lora: trained and initial have different"):
        lj.pissa_to_lora({"kernel": initial["kernel"], "x": w}, initial)
    other = lj.pissa_init(lj.lorafy({"kernel": w}, rank=2))
    with pytest.raises(ValueError, match="^pissa_to_lora: leaf 'kernel': its node in initial"):
        lj.pissa_to_lora(initial, other)
    with pytest.raises(TypeError, match="^pissa_to_lora: leaf 'kernel': the base weight is"):
        q = lj.quantize(initial)
        lj.pissa_to_lora(q, q)


def test_pissa_niter_randomized_svd():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    low = jax.random.normal(k1, (37, 4)) @ jax.random.normal(k2, (4, 23))   # rank 4
    for shape_w in (low, low.T):                                # tall and wide
        exact = lj.pissa_init(lj.lorafy({"kernel": shape_w}, rank=4, alpha=8.0))["kernel"]
        fast = lj.pissa_init(lj.lorafy({"kernel": shape_w}, rank=4, alpha=8.0), niter=2,
                             key=jax.random.key(1))["kernel"]
        # rank <= r: the sketch spans the range, the factors' product is exact
        close(fast.a @ fast.b, exact.a @ exact.b, 1e-4)
        assert float(jnp.abs(fast.w0).max()) < 1e-4
    full = low + 0.3 * jax.random.normal(k3, low.shape)
    exact = lj.pissa_init(lj.lorafy({"kernel": full}, rank=4))["kernel"]
    fast = lj.pissa_init(lj.lorafy({"kernel": full}, rank=4), niter=4)["kernel"]
    ratio = float(jnp.linalg.norm(fast.w0) / jnp.linalg.norm(exact.w0))
    assert 1.0 - 1e-5 <= ratio < 1.02          # the residual is near the optimal one
    close(lj.merge({"k": fast})["k"], full, 1e-5)               # the model is unchanged
    with pytest.raises(ValueError, match="^pissa_init: key is only used with niter"):
        lj.pissa_init(lj.lorafy({"kernel": full}, rank=4), key=jax.random.key(0))
