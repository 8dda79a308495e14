"""DoRA where PEFT has it: embeddings (per-feature magnitude, norm over the vocabulary),
convolutions kept factored, and PEFT ``use_dora=True`` adapters imported and exported
with logits equal to PEFT's."""

import dataclasses
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name
from safetensors.numpy import load_file, save_file

import lora_jax as lj
from helpers import close, random_hf_llama
from lora_jax.interop import from_peft, to_peft
from lora_jax.variants import DoraWeight, gram_norm, to_dora

_HAVE_ORACLES = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
oracle = pytest.mark.skipif(not _HAVE_ORACLES, reason="needs torch, transformers and peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _random_dora(params, key, scale=0.3):
    """Random A, B and a magnitude 1 +- 0.2 off the norm on every DoraWeight."""
    flat, treedef = jax.tree.flatten(params, is_leaf=lambda x: isinstance(x, DoraWeight))
    out = []
    for k, x in zip(jax.random.split(key, len(flat)), flat):
        if isinstance(x, DoraWeight):
            ka, kb, km = jax.random.split(k, 3)
            x = dataclasses.replace(
                x, a=jax.random.normal(ka, x.a.shape) * scale,
                b=jax.random.normal(kb, x.b.shape) * scale,
                m=x.m * (1.0 + 0.2 * jax.random.normal(km, x.m.shape)))
        out.append(x)
    return jax.tree.unflatten(treedef, out)


# PEFT tests/test_custom_models.py: "Embedding + transformers Conv1D 1 LoRA + DoRA" (DoRA on
# nn.Embedding; DoraEmbeddingLayer: magnitude [D], norm over the vocabulary axis)
def test_dora_embedding_matches_hand_computed():
    e = np.random.RandomState(0).randn(11, 7).astype(np.float32)
    dp = to_dora(lj.lorafy({"embedding": jnp.asarray(e)}, rank=3, alpha=5.0,
                           targets="embedding"))
    np.testing.assert_allclose(dp["embedding"].m, np.linalg.norm(e, axis=0), rtol=1e-6)
    dp = _random_dora(dp, jax.random.key(1))
    w = dp["embedding"]
    a, b, m = (np.asarray(v, np.float64) for v in (w.a, w.b, w.m))
    v = e + 5.0 / 3 * a @ b                                      # [V, D]
    table = v * (m / np.linalg.norm(v, axis=0))                  # one factor per feature
    tok = jnp.asarray([[1, 10, 3], [0, 5, 5]])

    def look(p, t):
        return jnp.take(p["embedding"], t, axis=0)
    got = jax.jit(lj.lora(look, strict=True))(dp, tok)          # strict: never formed
    close(got, table[np.asarray(tok)], 1e-5)
    # grads of a, b and m equal those through the formed table (norm detached in both)
    g = jax.grad(lambda p: jnp.sum(lj.lora(look, strict=True)(p, tok) ** 2))(dp)["embedding"]

    def formed(p):
        x = p["embedding"]
        f = x.m / jax.lax.stop_gradient(x.weight_norm())
        return jnp.sum(look({"embedding": x.as_lora().materialize() * f[None]}, tok) ** 2)
    g2 = jax.grad(formed)(dp)["embedding"]
    for f in ("a", "b", "m"):
        close(getattr(g, f), getattr(g2, f), 1e-4)


# PEFT tests/test_custom_models.py: "Conv2d 1 LoRA with DoRA" (DoraConv2dLayer), checked
# against PEFT's module itself
@oracle
def test_dora_conv_matches_peft_conv2d_without_forming_the_kernel():
    import peft
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(5, 7, (3, 2), padding=(1, 0), bias=False)

        def forward(self, x):
            return self.conv(x)
    torch.manual_seed(0)
    pm = peft.get_peft_model(Net(), peft.LoraConfig(r=3, lora_alpha=5, use_dora=True,
                                                    target_modules=["conv"]))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "magnitude" in name:
                p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    conv = pm.base_model.model.conv
    sd = {k: v.detach().numpy() for k, v in conv.state_dict().items()}
    x = np.random.RandomState(2).randn(2, 5, 6, 9).astype(np.float32)
    with torch.no_grad():
        ref = pm.eval()(torch.tensor(x)).numpy()
    w0 = sd["base_layer.weight"]                                 # [O, I, kh, kw]
    a = np.transpose(sd["lora_A.default.weight"], (1, 2, 3, 0))  # [I, kh, kw, r]
    b = sd["lora_B.default.weight"].reshape(7, 3).T              # [r, O]
    m = sd["lora_magnitude_vector.default.weight"].reshape(7)    # PEFT keeps [1, O, 1, 1]
    w = DoraWeight(jnp.asarray(w0), jnp.asarray(a), jnp.asarray(b), jnp.asarray(m),
                   alpha=5.0, in_axes=(1, 2, 3))

    def f(k, x):
        return jax.lax.conv_general_dilated(x, k, (1, 1), [(1, 1), (0, 0)],
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))
    close(jax.jit(lj.lora(f, strict=True))(w, jnp.asarray(x)), ref, 1e-5)
    close(w.weight_norm(), np.linalg.norm((w0 + 5 / 3 * np.einsum(
        "ihwr,ro->oihw", a, b)).reshape(7, -1), axis=1), 1e-5)


def test_dora_through_a_transpose_scale_and_name_stays_factored():
    """``x @ W.T`` of an (out, in) weight and a multi-axis kernel moved to heads-last: the
    transposed node is DoRA over the permuted weight (m follows its output axes). A scalar
    scale goes to m; ``checkpoint_name`` names every leaf."""
    k = jax.random.split(jax.random.key(0), 3)
    params = {"fc": jax.random.normal(k[0], (7, 5)), "o": jax.random.normal(k[1], (3, 2, 5))}
    lay = {"fc": (0, (1,)), "o": (0, (0, 1))}
    dp = _random_dora(to_dora(lj.lorafy(params, rank=2, targets=list(params), layout=lay)),
                      jax.random.key(1))

    def f(p, x):                                   # x [B, 5]
        h = jnp.tanh(x @ (checkpoint_name(p["fc"], "fc").T * 0.5))     # [B, 7]
        o = -jnp.transpose(p["o"], (2, 1, 0)) / 3.0  # [5, 2, 3]: in axes (2, 1) now
        return jnp.einsum("bkh,dkh->bd", h[:, 1:].reshape(-1, 2, 3), o)
    x = jax.random.normal(k[2], (4, 5))

    def formed(p):
        return {n: w.as_lora().materialize() * jnp.expand_dims(
            w.m / jax.lax.stop_gradient(w.weight_norm()), w.in_axes) for n, w in p.items()}
    close(jax.jit(lj.lora(f, strict=True))(dp, x), f(formed(dp), x), 1e-5)
    g = jax.grad(lambda p: jnp.sum(lj.lora(f, strict=True)(p, x) ** 2))(dp)
    g2 = jax.grad(lambda p: jnp.sum(f(formed(p), x) ** 2))(dp)
    for n in params:
        for field in ("a", "b", "m"):
            close(getattr(g[n], field), getattr(g2[n], field), 1e-4)


def test_gram_norm_equals_the_formed_norm_for_n_adapters():
    rs = np.random.RandomState(3)
    w0, a, b = rs.randn(11, 7), rs.randn(4, 11, 5), rs.randn(4, 5, 7)
    s = np.array([0.5, 2.0, 0.0, -1.0])
    want = np.linalg.norm(w0 + s[:, None, None] * a @ b, axis=1)            # [4, 7]
    got = gram_norm(jnp.asarray(w0[None], jnp.float32), jnp.asarray(a, jnp.float32),
                    jnp.asarray(b, jnp.float32), jnp.asarray(s[:, None], jnp.float32))
    close(got, want, 1e-5)


# ----------------------------------------------------------------------------- PEFT files

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    if not _HAVE_ORACLES:
        pytest.skip("needs torch, transformers and peft")
    import torch
    import transformers

    from lora_jax.models import from_pretrained
    path = tmp_path_factory.mktemp("hf_llama")
    random_hf_llama(torch, transformers).save_pretrained(path)
    model, params = from_pretrained(path)
    ids = np.random.RandomState(0).randint(0, 97, (2, 9))
    return path, model, params, ids


def _peft_logits(pm, ids):
    import torch
    with torch.no_grad():
        return pm(torch.tensor(ids)).logits.numpy()


# PEFT tests/test_decoder_models.py::test_save_pretrained / test_from_pretrained_config_construction
# with LoraConfig(use_dora=True) (DoRA adapters saved by PEFT load with equal outputs)
@oracle
def test_from_peft_imports_a_peft_dora_adapter(hf, tmp_path):
    import peft
    import torch
    import transformers
    path, model, params, ids = hf
    pm = peft.get_peft_model(transformers.LlamaForCausalLM.from_pretrained(path),
                             peft.LoraConfig(r=3, lora_alpha=7, use_dora=True,
                                             target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "magnitude" in name:
                p.mul_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.eval().save_pretrained(tmp_path / "ad")
    sd = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert sd["base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector"].shape \
        == (35,)
    assert sd["base_model.model.model.embed_tokens.lora_magnitude_vector"].shape == (35,)
    dp = from_peft(tmp_path / "ad", params)
    q = dp["layers"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, DoraWeight) and q.m.shape == (2, 30)
    assert isinstance(dp["embed_tokens"]["embedding"], DoraWeight)
    ours = jax.jit(lj.lora(model.apply, strict=True))({"params": dp}, jnp.asarray(ids))
    ref = _peft_logits(pm, ids)
    with pm.disable_adapter():
        assert np.abs(ref - _peft_logits(pm, ids)).max() > 1e-2      # the adapter matters
    close(ours, ref, 1e-4)


# PEFT tests/testing_common.py::_test_save_pretrained (an adapter made elsewhere loads with
# PeftModel.from_pretrained and gives the same outputs), use_dora=True
@oracle
def test_to_peft_exports_dora_that_peft_loads(hf, tmp_path):
    import peft
    import transformers
    path, model, params, ids = hf
    dp = _random_dora(to_dora(lj.lorafy(
        params, rank=3, alpha=5.0, key=jax.random.key(4),
        targets=r"(q_proj|v_proj|down_proj)/kernel$|embed_tokens/embedding$")),
        jax.random.key(5))
    ours = lj.lora(model.apply)({"params": dp}, jnp.asarray(ids))
    out = to_peft(dp, tmp_path / "ours")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    sd = load_file(out / "adapter_model.safetensors")
    np.testing.assert_array_equal(
        sd["base_model.model.model.layers.0.self_attn.v_proj.lora_magnitude_vector"],
        np.asarray(dp["layers"]["self_attn"]["v_proj"]["kernel"].m[0]))
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(path),
                                        out).eval()
    base = lj.lora(model.apply)({"params": params}, jnp.asarray(ids))
    assert float(jnp.abs(ours - base).max()) > 1e-2             # the adapter matters
    close(_peft_logits(pm, ids), ours, 1e-4)
    back = from_peft(out, params)                                 # and the round trip is exact
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(dp)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dora_peft_files_that_do_not_fit_are_refused(tmp_path):
    base = {"enc": {"w": jnp.ones((5, 7))}}
    kw = {"module_map": {"enc/w": "model.enc"}}
    ab = {"base_model.model.model.enc.lora_A.weight": np.ones((2, 5), np.float32),
          "base_model.model.model.enc.lora_B.weight": np.ones((7, 2), np.float32)}
    mag = {"base_model.model.model.enc.lora_magnitude_vector": np.ones(7, np.float32)}

    def write(name, tensors, **cfg):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["enc"], **cfg}))
        return d
    with pytest.raises(ValueError, match=r"missing=\['model\.enc\.lora_magnitude_vector'\]"):
        from_peft(write("no_m", ab, use_dora=True), base, **kw)
    with pytest.raises(ValueError, match=r"unknown keys=\[.*lora_magnitude_vector'\]"):
        from_peft(write("no_flag", {**ab, **mag}), base, **kw)
    bad = {**ab, "base_model.model.model.enc.lora_magnitude_vector": np.ones(5, np.float32)}
    with pytest.raises(ValueError, match="lora_magnitude_vector has shape"):
        from_peft(write("shape", bad, use_dora=True), base, **kw)
    w = from_peft(write("ok", {**ab, **mag}, use_dora=True), base, **kw)["enc"]["w"]
    # hand-computed: V = 1 + 2*(1*1*2) = 5 everywhere; m = 1: the weight is 5/||V||_col
    assert isinstance(w, DoraWeight)
    close(w.materialize(), np.full((5, 7), 5.0 / np.sqrt(5 * 25.0)), 1e-6)
    mixed = {"a": to_dora(lj.lorafy({"w": jnp.ones((5, 7))}, rank=2, targets="w")),
             "b": lj.lorafy({"w": jnp.ones((5, 7))}, rank=2, targets="w")}
    with pytest.raises(ValueError, match="mix DoRA leaves"):
        to_peft(mixed, tmp_path / "mixed", module_map={"a/w": "model.a", "b/w": "model.b"})
