"""DoRA (vs PEFT use_dora=True), PiSSA / OLoRA init (vs PEFT), LoRA+ optimizer."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from helpers import close, random_hf_llama, randomize, randomize_b, tx_update
from lora_jax import (
    DoraWeight,
    dorafy,
    loraplus_labels,
    loraplus_optimizer,
    olora_init,
    pissa_init,
    to_dora,
)


def _mlp():
    model = nn.Sequential([nn.Dense(13), jax.nn.gelu, nn.Dense(9), jax.nn.gelu, nn.Dense(5)])
    x = jax.random.normal(jax.random.key(1), (6, 11))
    return model, model.init(jax.random.key(0), x)["params"], x


def _randomize_dora(p, key):
    p = randomize_b(p, key)
    def bump(w):
        if isinstance(w, DoraWeight):
            return dataclasses.replace(w, m=w.m * (1.0 + 0.3 * jnp.sin(jnp.arange(w.m.size,
                                       dtype=w.m.dtype).reshape(w.m.shape))))
        return w
    flat, td = jax.tree.flatten(p, is_leaf=lambda x: isinstance(x, DoraWeight))
    out = []
    for k, w in zip(jax.random.split(key, len(flat)), flat):
        if isinstance(w, DoraWeight):
            w = dataclasses.replace(w, b=jax.random.normal(k, w.b.shape, w.b.dtype) * 0.3)
        out.append(bump(w))
    return jax.tree.unflatten(td, out)


# ----------------------------------------------------------------------------- DoRA

def test_dora_node_forward_and_grads():
    model, params, x = _mlp()
    dp = dorafy(params, rank=3, alpha=5.0, key=jax.random.key(2))
    apply = lj.lora(model.apply)
    # fresh DoRA == base
    close(apply({"params": dp}, x), model.apply({"params": params}, x), 1e-6)
    dp = _randomize_dora(dp, jax.random.key(3))
    w = dp["layers_0"]["kernel"]
    V = np.asarray(w.w0 + w.scale * w.a @ w.b, np.float64)
    want = V * (np.asarray(w.m) / np.linalg.norm(V, axis=0))
    close(w.materialize(), want, 1e-6)
    ref = model.apply({"params": lj.merge(dp)}, x)
    close(apply({"params": dp}, x), ref, 1e-5)
    close(jax.jit(apply)({"params": dp}, x), ref, 1e-5)
    # gradients w.r.t. a, b, m equal those through the formed weight (norm detached in both)
    tr, fr = lj.split(dp)
    assert tr["layers_0"]["kernel"].m is not None and fr["layers_0"]["kernel"].m is None

    def loss(tr, f):
        return jnp.sum(jnp.sin(f(lj.combine(tr, fr))))
    g = jax.grad(loss)(tr, lambda p: apply({"params": p}, x))
    g_ref = jax.grad(loss)(tr, lambda p: model.apply({"params": lj.merge(p)}, x))
    for u, v in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        close(u, v, 1e-4)
    assert float(jnp.abs(g["layers_0"]["kernel"].m).max()) > 0


def test_dora_stacked_scan_and_quantized_base():
    # a scanned stack of layers: the node is sliced per layer by lax.scan
    L, d = 3, 64
    w = jax.random.normal(jax.random.key(0), (L, d, d)) * 0.2
    x = jax.random.normal(jax.random.key(1), (4, d))

    def f(p, x):
        return jax.lax.scan(lambda h, k: (jnp.tanh(h @ k), None), x, p["w"])[0]
    dp = _randomize_dora(dorafy({"w": w}, rank=2, targets="w"), jax.random.key(2))
    assert dp["w"].m.shape == (L, d)
    close(lj.lora(f)(dp, x), f(lj.merge(dp), x), 1e-5)
    # quantized base: the norm uses the dequantized w0, inside the same rule
    q = lj.quantize({"w": w}, "nf4", targets="w")
    dq = _randomize_dora(dorafy(q, rank=2, targets="w"), jax.random.key(2))
    deq = dataclasses.replace(dq["w"], w0=lj.dequantize(dq["w"].w0))
    close(lj.lora(f)(dq, x), f({"w": deq.materialize()}, x), 1e-5)


def test_dora_errors():
    # (DoRA on embedding tables is supported: tests/variants/test_dora_parity.py)
    with pytest.raises(ValueError, match="no LoraWeight"):
        to_dora({"k": jnp.ones((3, 3))})


def _torch_dora_llama(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = random_hf_llama(torch, transformers)
    hf.save_pretrained(tmp_path)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=3, lora_alpha=7, use_dora=True,
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
    return torch, pm.eval()


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_dora_matches_peft_llama(tmp_path):
    torch, pm = _torch_dora_llama(tmp_path)
    from lora_jax.models import from_pretrained
    model, params = from_pretrained(tmp_path)
    sd = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
    mods = {"q_proj": "self_attn", "v_proj": "self_attn", "down_proj": "mlp"}
    dp = lj.lorafy(params, rank=3, alpha=7.0, targets=r"(q_proj|v_proj|down_proj)/kernel$")
    dp = to_dora(dp)
    for name, parent in mods.items():
        pre = [f"base_model.model.model.layers.{i}.{parent}.{name}" for i in range(2)]
        a = np.stack([sd[f"{p}.lora_A.default.weight"].T for p in pre])
        b = np.stack([sd[f"{p}.lora_B.default.weight"].T for p in pre])
        m = np.stack([sd[f"{p}.lora_magnitude_vector.default.weight"] for p in pre])
        node = dp["layers"][parent][name]["kernel"]
        dp["layers"][parent][name]["kernel"] = dataclasses.replace(
            node, a=jnp.asarray(a), b=jnp.asarray(b), m=jnp.asarray(m))
    x = np.random.RandomState(0).randint(0, 97, (2, 9))
    with torch.no_grad():
        ref = pm(torch.tensor(x)).logits.numpy()
    close(jax.jit(lj.lora(model.apply))({"params": dp}, jnp.asarray(x)), ref, 1e-4)
    # and PEFT's magnitude init is our m = ||w0 + s*a@b|| (B = 0 there: ||w0||)
    m0 = to_dora(lj.lorafy(params, rank=3, targets="q_proj/kernel$"))
    w0 = np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"])
    close(m0["layers"]["self_attn"]["q_proj"]["kernel"].m, np.linalg.norm(w0, axis=1), 1e-6)


# ----------------------------------------------------------------------------- PiSSA / OLoRA

def _torch_linears(torch, init, d_in=12, d_out=9, r=3, alpha=5):
    peft = pytest.importorskip("peft")

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin1 = torch.nn.Linear(d_in, d_out, bias=False)
            self.lin2 = torch.nn.Linear(d_out, d_in, bias=False)

        def forward(self, x):
            return self.lin2(torch.tanh(self.lin1(x)))

    torch.manual_seed(0)
    m = M()
    w = {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}
    pm = peft.get_peft_model(m, peft.LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=init,
                                                target_modules=["lin1", "lin2"]))
    return w, pm


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pissa_olora_match_peft(init):
    torch = pytest.importorskip("torch")
    w, pm = _torch_linears(torch, init)
    params = {"lin1": {"kernel": jnp.asarray(w["lin1.weight"].T)},
              "lin2": {"kernel": jnp.asarray(w["lin2.weight"].T)}}
    lp = lj.lorafy(params, rank=3, alpha=5.0)
    lp = (pissa_init if init == "pissa" else olora_init)(lp)
    sd = {k: v.detach().numpy() for k, v in pm.state_dict().items()}
    for name in ("lin1", "lin2"):
        node = lp[name]["kernel"]
        A = sd[f"base_model.model.{name}.lora_A.default.weight"]      # [r, in]
        B = sd[f"base_model.model.{name}.lora_B.default.weight"]      # [out, r]
        W = sd[f"base_model.model.{name}.base_layer.weight"]         # residual [out, in]
        sign = np.sign(np.sum(np.asarray(node.a) * A.T, axis=0))       # per singular pair
        close(np.asarray(node.a) * sign, A.T, 1e-4)
        close(np.asarray(node.b) * sign[:, None], B.T, 1e-4)
        close(node.w0, W.T, 1e-5)
        close(node.materialize(), params[name]["kernel"], 1e-5)   # starts as the base

    def f(p, x):
        return jnp.tanh(x @ p["lin1"]["kernel"]) @ p["lin2"]["kernel"]
    x = jax.random.normal(jax.random.key(0), (4, 12))
    close(lj.lora(f)(lp, x), f(params, x), 1e-5)


def test_pissa_stacked_and_errors():
    w = jax.random.normal(jax.random.key(0), (2, 8, 6))
    lp = pissa_init(lj.lorafy({"w": w}, rank=2, alpha=4.0, targets="w"))
    n = lp["w"]
    for layer in range(2):
        u, s, vh = np.linalg.svd(np.asarray(w[layer]), full_matrices=False)
        close(np.abs(n.a[layer] @ n.b[layer]), np.abs((u[:, :2] * s[:2]) @ vh[:2]) / 2.0, 1e-5)
    close(n.materialize(), w, 1e-5)
    q = lj.lorafy(lj.quantize({"w": jnp.ones((64, 64))}, "nf4", targets="w"), rank=2, targets="w")
    with pytest.raises(TypeError, match="float base"):
        pissa_init(q)
    with pytest.raises(ValueError, match="no LoraWeight"):
        olora_init({"w": w})


# ----------------------------------------------------------------------------- LoRA+

def test_loraplus_b_updates_are_ratio_times():
    model, params, x = _mlp()
    dp = to_dora(lj.lorafy(params, rank=2, targets="layers_0/kernel"))
    lp = randomize_b(lj.lorafy(params, rank=2), jax.random.key(4))
    lp = dict(lp, layers_0=dp["layers_0"])
    def updates(tx, tree, steps=3):
        state = tx.init(tree)
        out = []
        for i in range(steps):
            g = jax.tree.map(lambda v, i=i: jnp.cos(v * 3.0 + 1.0) * (i + 1.0), tree)
            u, state = tx_update(tx, g, state, tree)
            out.append(u)
        return out

    labels = loraplus_labels(lp)
    assert labels["layers_0"]["kernel"].m == "lora_b" and labels["layers_2"]["kernel"].a == "lora_a"
    assert labels["layers_2"]["bias"] == "frozen" and labels["layers_2"]["kernel"].w0 == "frozen"

    ratio = 16.0   # a power of two: lr * ratio multiplies exactly
    plain = updates(optax.adam(1e-2), lp)
    for tx in (loraplus_optimizer(1e-2, lp, ratio=ratio),
               loraplus_optimizer(lambda lr: optax.adamw(lr, weight_decay=0.0), lp, lr=1e-2,
                                  ratio=ratio)):
        plus = updates(tx, lp)
        for up, uq in zip(plus, plain):
            for name in ("layers_0", "layers_2"):
                k, kq = up[name]["kernel"], uq[name]["kernel"]
                np.testing.assert_array_equal(np.asarray(k.a), np.asarray(kq.a))
                np.testing.assert_array_equal(np.asarray(k.b), ratio * np.asarray(kq.b))
                assert float(jnp.abs(k.w0).max()) == 0.0
            assert float(jnp.abs(up["layers_2"]["bias"]).max()) == 0.0
            np.testing.assert_array_equal(np.asarray(up["layers_0"]["kernel"].m),
                                          ratio * np.asarray(uq["layers_0"]["kernel"].m))
    # a built optimizer: B gets exactly ratio * its update (any ratio); trainable half works
    tr, _ = lj.split(lp)
    sgd = optax.sgd(0.1, momentum=0.9)
    plus = updates(loraplus_optimizer(sgd, ratio=3.0), tr)
    base = updates(sgd, tr)
    for up, uq in zip(plus, base):
        k, kq = up["layers_2"]["kernel"], uq["layers_2"]["kernel"]
        np.testing.assert_array_equal(np.asarray(k.a), np.asarray(kq.a))
        np.testing.assert_array_equal(np.asarray(k.b), np.asarray(kq.b) * np.float32(3.0))
    with pytest.raises(ValueError, match="ratio must be a positive"):
        loraplus_optimizer(1e-3, lp, ratio=0)
    with pytest.raises(ValueError, match="pass lr="):
        loraplus_optimizer(optax.adam, lp, ratio=4)
    with pytest.raises(ValueError, match="no LoRA node"):
        loraplus_optimizer(1e-3, params, ratio=4)


def test_dora_through_core_split_merge_and_checkpoint(tmp_path, key):
    p = {"d": {"kernel": jax.random.normal(key, (5, 7))}}
    dp = randomize(dorafy(p, 2, key=key), key, node_type=lj.DoraWeight)   # B != 0
    assert np.asarray(dp["d"]["kernel"].b).any()
    tr, fr = lj.split(dp)
    assert tr["d"]["kernel"].m is not None and fr["d"]["kernel"].m is None
    assert lj.count_params(dp)["trainable"] == 5 * 2 + 2 * 7 + 7
    assert lj.trainable_mask(dp)["d"]["kernel"].m is True
    w = dp["d"]["kernel"]
    close(lj.merge(dp)["d"]["kernel"], w.materialize(), 0)
    lj.save_adapter(tmp_path, dp, step=1)
    zeroed = jax.tree.map(jnp.zeros_like, tr)
    restored = lj.restore_adapter(tmp_path, lj.combine(zeroed, fr))
    np.testing.assert_array_equal(np.asarray(restored["d"]["kernel"].m), np.asarray(w.m))
    np.testing.assert_array_equal(np.asarray(restored["d"]["kernel"].b), np.asarray(w.b))
