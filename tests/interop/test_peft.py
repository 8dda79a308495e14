"""PEFT interop: adapters trained here load in PEFT (and merge) with equal logits;
PEFT-made adapters load here with equal logits; the format round trip (layouts, mixed
ranks/alphas/rsLoRA) against hand-computed weights, without torch."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file, save_file

import lora_jax
from helpers import SMALL_LLAMA, randomize_b
from lora_jax.core import path_str
from lora_jax.interop import from_peft, to_peft
from lora_jax.models import loading

_HAVE_ORACLES = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
if _HAVE_ORACLES:
    import peft
    import torch
    import transformers
oracle = pytest.mark.skipif(not _HAVE_ORACLES, reason="needs torch, transformers and peft")

# transformers deprecation noise raised inside PEFT (not ours) under -W error
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is_gradient_checkpointing.*:FutureWarning"
)

SMALL = dict(SMALL_LLAMA, num_key_value_heads=1)     # one KV head: GQA


def _save_hf(path, *, tie, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**SMALL, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path


def _load_hf(path):
    return transformers.LlamaForCausalLM.from_pretrained(path).eval()


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = _save_hf(tmp_path_factory.mktemp("hf_untied"), tie=False)
    model, params = loading.from_pretrained(path)
    return path, model, params


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(0).randint(0, SMALL["vocab_size"], (2, 13))


def _train(model, lp, ids, steps=3):
    trainable, frozen = lora_jax.split(lp)
    f = lora_jax.lora(model.apply)

    def loss_fn(tr, x):
        logits = f({"params": lora_jax.combine(tr, frozen)}, x[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:]).mean()

    opt = optax.sgd(0.1)  # (optax.adam trips strict dtype promotion: float ** int32 count)
    state = opt.init(trainable)

    @jax.jit
    def step(tr, state, x):
        loss, g = jax.value_and_grad(loss_fn)(tr, x)
        upd, state = opt.update(g, state, tr)
        return optax.apply_updates(tr, upd), state, loss

    x = jnp.asarray(ids)
    losses = []
    for _ in range(steps):
        trainable, state, loss = step(trainable, state, x)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    return lora_jax.combine(trainable, frozen)


def _lora_leaves(tree):
    return {
        path_str(p): l
        for p, l in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, lora_jax.LoraWeight)
        )[0]
        if isinstance(l, lora_jax.LoraWeight)
    }


@oracle
def test_export_trained_adapter_to_peft(base, ids, tmp_path):
    path, model, params = base
    lp = lora_jax.lorafy(
        params,
        rank=4,
        alpha=8.0,
        targets=[r"self_attn/(q|v)_proj/kernel", r"mlp/down_proj/kernel", r"^lm_head/kernel"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"v_proj": 3.0},
        key=jax.random.key(1),
    )
    lp = _train(model, lp, ids)
    ours = np.asarray(lora_jax.lora(model.apply)({"params": lp}, jnp.asarray(ids)))
    base_logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(ours - base_logits).max() > 1e-2  # training moved the adapter

    out = to_peft(lp, tmp_path / "adapter", base_model_name_or_path=str(path))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is False
    assert sorted(cfg["target_modules"]) == ["down_proj", "lm_head", "q_proj", "v_proj"]
    assert cfg["rank_pattern"] == {"down_proj": 2} and cfg["alpha_pattern"] == {"v_proj": 3}
    assert cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False and not cfg["modules_to_save"]
    sd = load_file(out / "adapter_model.safetensors")
    assert sd["base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"].shape == (4, 35)
    assert sd["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"].shape == (30, 4)
    assert sd["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (2, 33)
    assert sd["base_model.model.lm_head.lora_B.weight"].shape == (97, 4)
    assert len(sd) == 2 * (3 * 3 + 1)
    assert not list(tmp_path.glob(".adapter*"))  # atomic write left no temp dirs

    pm = peft.PeftModel.from_pretrained(_load_hf(path), out).eval()
    np.testing.assert_allclose(_torch_logits(pm, ids), ours, atol=1e-4, rtol=0)
    merged = pm.merge_and_unload()
    np.testing.assert_allclose(_torch_logits(merged, ids), ours, atol=1e-4, rtol=0)

    # Round trip through our own loader (onto the base and onto lorafied params).
    back = from_peft(out, params)
    np.testing.assert_allclose(
        lora_jax.lora(model.apply)({"params": back}, jnp.asarray(ids)), ours, atol=1e-5
    )
    leaves = _lora_leaves(back)
    assert leaves["layers/mlp/down_proj/kernel"].rank == 2
    assert leaves["layers/self_attn/v_proj/kernel"].alpha == 3.0
    again = from_peft(out, lp)
    np.testing.assert_allclose(
        lora_jax.lora(model.apply)({"params": again}, jnp.asarray(ids)), ours, atol=1e-5
    )

    # Overwrite in place: still atomic and replaced.
    to_peft(lp, out)
    assert (out / "adapter_model.safetensors").exists()


@oracle
def test_export_embedding_lora(base, ids, tmp_path):
    path, model, params = base
    lp = lora_jax.lorafy(
        params, rank=3, targets=[r"embed_tokens/embedding", r"o_proj"], key=jax.random.key(2)
    )
    lp = _train(model, lp, ids, steps=2)
    ours = np.asarray(lora_jax.lora(model.apply)({"params": lp}, jnp.asarray(ids)))
    out = to_peft(lp, tmp_path / "emb")
    sd = load_file(out / "adapter_model.safetensors")
    assert sd["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (3, 97)
    assert sd["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (35, 3)
    pm = peft.PeftModel.from_pretrained(_load_hf(path), out).eval()
    np.testing.assert_allclose(_torch_logits(pm, ids), ours, atol=1e-4, rtol=0)
    back = from_peft(out, params)
    np.testing.assert_allclose(
        lora_jax.lora(model.apply)({"params": back}, jnp.asarray(ids)), ours, atol=1e-5
    )


def _peft_adapter(path, out, **lora_kwargs):
    hf = _load_hf(path)
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", **lora_kwargs)
    pm = peft.get_peft_model(hf, cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:  # nonzero B (and A) so the adapter matters
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.eval()
    pm.save_pretrained(out)
    return pm


@oracle
@pytest.mark.parametrize(
    "lora_kwargs",
    [
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dict(
            r=4,
            lora_alpha=6,
            target_modules="all-linear",
            use_rslora=True,
            rank_pattern={"down_proj": 2, "model.layers.1.self_attn.k_proj": 3},
            alpha_pattern={"o_proj": 5},
        ),
    ],
    ids=["qv", "all-linear-rslora-patterns"],
)
def test_import_peft_adapter(base, ids, tmp_path, lora_kwargs):
    path, model, params = base
    pm = _peft_adapter(path, tmp_path / "ad", **lora_kwargs)
    ref = _torch_logits(pm, ids)
    lp = from_peft(tmp_path / "ad", params)
    leaves = _lora_leaves(lp)
    if lora_kwargs["target_modules"] == "all-linear":
        assert len(leaves) == 7  # lm_head is not "linear" for PEFT's all-linear
        assert all(w.rslora for w in leaves.values())
        assert leaves["layers/mlp/down_proj/kernel"].rank == 2
    else:
        assert sorted(leaves) == ["layers/self_attn/q_proj/kernel",
                                  "layers/self_attn/v_proj/kernel"]
        w = leaves["layers/self_attn/q_proj/kernel"]
        assert (w.rank, w.alpha, w.rslora) == (4, 8.0, False)
        assert w.a.shape == (3, 35, 4) and w.b.shape == (3, 4, 30)
        # KV-cached generation through lora(model.apply) == generation with merged weights
        from lora_jax.models import generate

        prompt = ids[:, :4]
        got = generate(model, lp, prompt, 6, apply_fn=lora_jax.lora(model.apply))
        want = generate(model, lora_jax.merge(lp), prompt, 6)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    ours = np.asarray(lora_jax.lora(model.apply)({"params": lp}, jnp.asarray(ids)))
    assert np.abs(ref - _torch_logits(_load_hf(path), ids)).max() > 1e-2  # adapter matters
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # merge() gives the same plain weights as PEFT's merge_and_unload
    merged = pm.merge_and_unload()
    q = merged.model.layers[1].self_attn.q_proj.weight.detach().numpy().T
    np.testing.assert_allclose(
        np.asarray(lora_jax.merge(lp)["layers"]["self_attn"]["q_proj"]["kernel"][1]), q, atol=1e-5
    )


@oracle
def test_import_errors(base, tmp_path):
    path, model, params = base
    _peft_adapter(path, tmp_path / "ad", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    st = tmp_path / "ad" / "adapter_model.safetensors"
    sd = load_file(st)

    def write(d, tensors):
        d.mkdir()
        cfg = (tmp_path / "ad" / "adapter_config.json").read_text()
        (d / "adapter_config.json").write_text(cfg)
        save_file(tensors, d / "adapter_model.safetensors")
        return d

    extra = dict(sd)
    extra["base_model.model.model.layers.0.self_attn.zz_proj.lora_A.weight"] = np.zeros(
        (2, 35), np.float32)
    with pytest.raises(ValueError, match="zz_proj"):
        from_peft(write(tmp_path / "extra", extra), params)

    missing = dict(sd)
    del missing["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj\.lora_B"):
        from_peft(write(tmp_path / "missing", missing), params)

    no_layer = {k: v for k, v in sd.items() if ".layers.2.self_attn.q_proj." not in k}
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.q_proj"):
        from_peft(write(tmp_path / "nolayer", no_layer), params)

    # lorafied params with leaves the adapter doesn't cover
    lp = lora_jax.lorafy(params, rank=2, targets=[r"o_proj"])
    with pytest.raises(ValueError, match="o_proj"):
        from_peft(tmp_path / "ad", lp)


@oracle
def test_export_errors(tmp_path):
    path = _save_hf(tmp_path / "tied", tie=True)
    model, params = loading.from_pretrained(path)
    with pytest.raises(ValueError, match="no LoraWeight"):
        to_peft(params, tmp_path / "x")
    lp = lora_jax.lorafy(params, rank=2, targets=[r"embed_tokens/embedding"])
    with pytest.raises(ValueError, match="tied"):
        to_peft(lp, tmp_path / "x")
    lp = lora_jax.lorafy({"foo": {"kernel": jnp.ones((4, 5))}}, rank=2)
    with pytest.raises(ValueError, match="module_map"):
        to_peft(lp, tmp_path / "x")
    out = to_peft(lp, tmp_path / "custom", module_map={"foo/kernel": "model.foo"})
    sd = load_file(out / "adapter_model.safetensors")
    assert "base_model.model.model.foo.lora_A.weight" in sd


# ------------------------------------------------------------------ format round trip, no torch

MAP = {"enc/w": "model.layers.{i}.enc", "head/w": "model.head"}


def _lw(key, a_shape, b_shape, w0, **kw):
    ka, kb = jax.random.split(key)
    return lora_jax.LoraWeight(w0, jax.random.normal(ka, a_shape), jax.random.normal(kb, b_shape),
                               **kw)


def _mixed_params():
    """A stacked (in, out) leaf with plain LoRA, and a torch-layout (out, in) leaf with rsLoRA."""
    k = jax.random.split(jax.random.key(0), 4)
    enc = _lw(k[0], (2, 5, 3), (2, 3, 7), jax.random.normal(k[1], (2, 5, 7)), alpha=6.0)
    head = _lw(k[2], (7, 2), (2, 5), jax.random.normal(k[3], (5, 7)), alpha=4.0, rslora=True,
               in_axes=(1,))
    return {"enc": {"w": enc}, "head": {"w": head}}


def test_roundtrip_keeps_layouts_and_rewrites_alpha_for_one_rslora_flag(tmp_path):
    params = _mixed_params()
    out = to_peft(params, tmp_path / "ad", module_map=MAP)
    cfg = json.loads((out / "adapter_config.json").read_text())
    # two of three modules are plain LoRA: the adapter says use_rslora=False, and the head's
    # alpha becomes the one with the same scale: 4/sqrt(2) = alpha/2 -> alpha = 4*sqrt(2)
    assert cfg["use_rslora"] is False and cfg["r"] == 3 and cfg["lora_alpha"] == 6
    assert cfg["rank_pattern"] == {"head": 2} and sorted(cfg["target_modules"]) == ["enc", "head"]
    np.testing.assert_allclose(cfg["alpha_pattern"]["head"], 4 * np.sqrt(2), rtol=1e-12)
    sd = load_file(out / "adapter_model.safetensors")
    enc, head = params["enc"]["w"], params["head"]["w"]
    np.testing.assert_array_equal(sd["base_model.model.model.layers.1.enc.lora_A.weight"],
                                  np.asarray(enc.a[1]).T)
    np.testing.assert_array_equal(sd["base_model.model.model.head.lora_B.weight"],
                                  np.asarray(head.b).T)                       # [out 5, r 2]

    template = {"enc": {"w": enc.w0},
                "head": {"w": lora_jax.LoraWeight(head.w0, jnp.zeros((7, 2)), jnp.zeros((2, 5)),
                                                  in_axes=(1,))}}
    back = from_peft(out, template, module_map=MAP)
    assert back["head"]["w"].in_axes == (1,) and back["enc"]["w"].in_axes == (0,)
    merged = lora_jax.merge(back)
    a, b = np.asarray(head.a), np.asarray(head.b)
    want_head = np.asarray(head.w0) + 4 / np.sqrt(2) * (a @ b).T
    np.testing.assert_allclose(merged["head"]["w"], want_head, rtol=1e-5, atol=1e-5)
    want_enc = np.asarray(enc.w0) + 2.0 * np.einsum("lir,lro->lio", enc.a, enc.b)
    np.testing.assert_allclose(merged["enc"]["w"], want_enc, rtol=1e-5, atol=1e-5)


def _write_peft(d, tensors, **config):
    d.mkdir()
    save_file({f"base_model.model.{k}": np.asarray(v, np.float32) for k, v in tensors.items()},
              d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return d


def test_layers_with_other_ranks_and_alphas_are_padded_exactly(tmp_path):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((2, 5, 7)).astype(np.float32)
    A0, B0 = rng.standard_normal((2, 5)), rng.standard_normal((7, 2))
    A1, B1 = rng.standard_normal((3, 5)), rng.standard_normal((7, 3))
    d = _write_peft(tmp_path / "ad", {"model.layers.0.enc.lora_A.weight": A0,
                                      "model.layers.0.enc.lora_B.weight": B0,
                                      "model.layers.1.enc.lora_A.weight": A1,
                                      "model.layers.1.enc.lora_B.weight": B1},
                    r=2, lora_alpha=4, rank_pattern={"layers.1.enc": 3},
                    alpha_pattern={"layers.1.enc": 9}, target_modules=["enc"])
    back = from_peft(d, {"enc": {"w": jnp.asarray(w0)}}, module_map={"enc/w": MAP["enc/w"]})
    w = back["enc"]["w"]
    assert w.a.shape == (2, 5, 3) and w.b.shape == (2, 3, 7) and w.scale == 1.0
    want = w0 + np.stack([4 / 2 * (B0 @ A0).T, 9 / 3 * (B1 @ A1).T])
    np.testing.assert_allclose(lora_jax.merge(back)["enc"]["w"], want, rtol=1e-5, atol=1e-5)


def test_hand_written_adapters_that_do_not_fit_are_refused(tmp_path):
    base = {"enc": {"w": jnp.zeros((2, 5, 7))}}
    kw = {"module_map": {"enc/w": MAP["enc/w"]}}
    ok = {f"model.layers.{i}.enc.lora_{x}.weight": np.zeros(s)
          for i in (0, 1) for x, s in (("A", (2, 5)), ("B", (7, 2)))}
    cfg = {"r": 2, "lora_alpha": 4, "target_modules": ["enc"]}
    no_b = {k: v for k, v in ok.items() if k != "model.layers.1.enc.lora_B.weight"}
    with pytest.raises(ValueError, match=r"missing=\['model\.layers\.1\.enc\.lora_B'\]"):
        from_peft(_write_peft(tmp_path / "no_b", no_b, **cfg), base, **kw)
    extra = {**ok, "model.layers.0.zz.lora_A.weight": np.zeros((2, 5))}
    with pytest.raises(ValueError,
                       match=r"unknown keys=\['base_model\.model\.model\.layers\.0\.zz\.lora_A"):
        from_peft(_write_peft(tmp_path / "extra", extra, **cfg), base, **kw)
    with pytest.raises(ValueError, match="disagree with the config rank 4"):
        from_peft(_write_peft(tmp_path / "rank", ok, **{**cfg, "r": 4}), base, **kw)
    with pytest.raises(ValueError, match="factors give a 5x7 update, the weight is"):
        from_peft(_write_peft(tmp_path / "shape", ok, **cfg), {"enc": {"w": jnp.zeros((2, 7, 5))}},
                  **kw)
    with pytest.raises(ValueError, match=r"missing=\[.*lora_magnitude_vector"):  # DoRA: m too
        from_peft(_write_peft(tmp_path / "dora", ok, **cfg, use_dora=True), base, **kw)
    pickled = tmp_path / "bin"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(cfg))
    (pickled / "adapter_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="pickle"):
        from_peft(pickled, base, **kw)


def _as_dora(lp):
    """Every LoraWeight as a DoraWeight whose magnitude is 1.5x the norm (so m matters)."""
    return {n: lora_jax.variants.DoraWeight(w.w0, w.a, w.b, lora_jax.variants.to_dora(
        {"w": w})["w"].m * 1.5, alpha=w.alpha, in_axes=w.in_axes) for n, w in lp.items()}


def _peft_gives_ours_and_reads_back(net, out, lp, x, ours, module_map, dora):
    """PEFT's model on the adapter at ``out`` gives ``ours``; from_peft onto ``lp`` gives back
    its factors (and magnitudes)."""
    pm = peft.PeftModel.from_pretrained(net.eval(), out).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(theirs, ours, atol=2e-5, rtol=0)
    back = from_peft(out, lp, module_map=module_map)
    for n in lp:
        assert back[n].in_axes == lp[n].in_axes
        for field in ("a", "b", "m") if dora else ("a", "b"):
            np.testing.assert_allclose(getattr(back[n], field), getattr(lp[n], field), atol=1e-6)


class _HeadsNet(torch.nn.Module if _HAVE_ORACLES else object):
    """The torch side of ``_heads_fn``: q_proj Linear(D, H*Dh), o_proj Linear(H*Dh, D) per
    layer, an Equinox-style (out, in) head."""

    def __init__(self, p):
        super().__init__()
        lin = torch.nn.Linear
        self.layers = torch.nn.ModuleList()
        for q, o in zip(p["q"], p["o"]):
            layer = torch.nn.Module()
            layer.q_proj = lin(q.shape[0], q.shape[1] * q.shape[2], bias=False)
            layer.o_proj = lin(o.shape[0] * o.shape[1], o.shape[2], bias=False)
            # torch flattens heads as h*Dh + k, as the kernels' own axis order does
            layer.q_proj.weight.data = torch.tensor(np.asarray(q).reshape(q.shape[0], -1).T)
            layer.o_proj.weight.data = torch.tensor(np.asarray(o).reshape(-1, o.shape[2]).T)
            self.layers.append(layer)
        self.head = lin(p["head"].shape[1], p["head"].shape[0], bias=False)
        self.head.weight.data = torch.tensor(np.asarray(p["head"]))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer.o_proj(torch.tanh(layer.q_proj(x)))
        return self.head(x)


def _heads_fn(p, x):
    """Scanned layers with DenseGeneral-style kernels q [L, D, H, Dh] and o [L, H, Dh, D],
    then an (out, in) head."""
    def layer(x, w):
        h = jnp.tanh(jnp.einsum("bd,dhk->bhk", x, w["q"]))
        return x + jnp.einsum("bhk,hkd->bd", h, w["o"]), None
    return jax.lax.scan(layer, x, {"q": p["q"], "o": p["o"]})[0] @ p["head"].T


@oracle
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_multi_axis_weights_export_as_flattened_linears(dora, tmp_path):
    """A weight with several input or output axes is PEFT's nn.Linear with each side
    flattened in the weight's axis order: PEFT's model on the exported adapter gives our
    outputs, and from_peft onto the lorafied params gives back the same factors."""
    k = jax.random.split(jax.random.key(0), 4)
    D, H, Dh, L = 5, 3, 2, 2
    p = {"q": jax.random.normal(k[0], (L, D, H, Dh)) * 0.5,
         "o": jax.random.normal(k[1], (L, H, Dh, D)) * 0.5,
         "head": jax.random.normal(k[2], (7, D))}
    x = jax.random.normal(k[3], (4, D))
    lp = lora_jax.lorafy(p, rank=3, alpha=5.0, fn=_heads_fn, args=(x,), targets=list(p))
    assert lp["o"].in_axes == (0, 1) and lp["head"].in_axes == (1,)
    lp = randomize_b(lp, jax.random.key(5))
    # the same adapter with o's input axes listed the other way round: a [L, Dh, H, r]
    swapped = dict(lp, o=lora_jax.LoraWeight(lp["o"].w0, jnp.swapaxes(lp["o"].a, 1, 2),
                                             lp["o"].b, alpha=5.0, in_axes=(1, 0)))
    np.testing.assert_allclose(lora_jax.merge(swapped)["o"], lora_jax.merge(lp)["o"])
    lp = _as_dora(lp) if dora else lp
    ours = np.asarray(lora_jax.lora(_heads_fn)(lp, x))
    assert np.abs(ours - np.asarray(_heads_fn(p, x))).max() > 1e-2
    mm = {"q": "layers.{i}.q_proj", "o": "layers.{i}.o_proj", "head": "head"}
    out = to_peft(lp, tmp_path / "ad", module_map=mm, task_type=None)
    sd = load_file(out / "adapter_model.safetensors")
    if not dora:
        again = load_file(to_peft(swapped, tmp_path / "sw", module_map=mm, task_type=None)
                          / "adapter_model.safetensors")
        assert all(np.array_equal(sd[name], again[name]) for name in sd)
        back = from_peft(tmp_path / "sw", swapped, module_map=mm)
        assert back["o"].in_axes == (1, 0)
        np.testing.assert_allclose(back["o"].a, swapped["o"].a, atol=1e-6)
    assert sd["base_model.model.layers.1.o_proj.lora_A.weight"].shape == (3, H * Dh)
    assert sd["base_model.model.layers.0.q_proj.lora_B.weight"].shape == (H * Dh, 3)
    _peft_gives_ours_and_reads_back(_HeadsNet(p), out, lp, x, ours, mm, dora)
    with pytest.raises(ValueError, match=r"leaf 'q' has per-layer shape \(5, 3, 2\); a plain"):
        from_peft(out, p, module_map=mm)


class _ConvNet(torch.nn.Module if _HAVE_ORACLES else object):
    def __init__(self, p):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, (3, 2), padding=(1, 0), bias=False)
        self.conv2 = torch.nn.Conv2d(6, 5, 1, bias=False)
        self.conv1.weight.data = torch.tensor(np.asarray(p["c1"]).transpose(3, 2, 0, 1))
        self.conv2.weight.data = torch.tensor(np.asarray(p["c2"]))

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def _conv_fn(p, x):
    """A Flax-style HWIO kernel, then an Equinox/PyTorch-style OIHW one, on NCHW input."""
    conv = jax.lax.conv_general_dilated
    h = conv(x, p["c1"], (1, 1), [(1, 1), (0, 0)], dimension_numbers=("NCHW", "HWIO", "NCHW"))
    return conv(jax.nn.relu(h), p["c2"], (1, 1), "VALID",
                dimension_numbers=("NCHW", "OIHW", "NCHW"))


@oracle
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_conv_kernels_export_as_peft_conv_lora(dora, tmp_path):
    """``to_peft(conv=)`` writes conv kernels (HWIO or OIHW) as PEFT's Conv2d LoRA: PEFT's
    model on the adapter gives our outputs; from_peft reads the same factors back."""
    k = jax.random.split(jax.random.key(0), 3)
    p = {"c1": jax.random.normal(k[0], (3, 2, 3, 6)) * 0.5,
         "c2": jax.random.normal(k[1], (5, 6, 1, 1)) * 0.5}
    x = jax.random.normal(k[2], (2, 3, 7, 5))
    lp = randomize_b(lora_jax.lorafy(p, rank=3, alpha=5.0, fn=_conv_fn, args=(x,)),
                     jax.random.key(5))
    assert lp["c1"].in_axes == (0, 1, 2) and lp["c2"].in_axes == (1, 2, 3)
    lp = _as_dora(lp) if dora else lp
    ours = np.asarray(lora_jax.lora(_conv_fn, strict=True)(lp, x))
    assert np.abs(ours - np.asarray(_conv_fn(p, x))).max() > 1e-2
    mm = {"c1": "conv1", "c2": "conv2"}
    out = to_peft(lp, tmp_path / "ad", module_map=mm, task_type=None, conv=r"^c\d$")
    sd = load_file(out / "adapter_model.safetensors")
    assert sd["base_model.model.conv1.lora_A.weight"].shape == (3, 3, 3, 2)   # [r, in, kh, kw]
    assert sd["base_model.model.conv1.lora_B.weight"].shape == (6, 3, 1, 1)
    _peft_gives_ours_and_reads_back(_ConvNet(p), out, lp, x, ours, mm, dora)
    fc = lora_jax.lorafy({"fc": jnp.ones((5, 7))}, rank=2, targets="fc")
    with pytest.raises(ValueError, match=r"to_peft: leaf 'fc' is named by conv=, but a kernel "
                                         r"of shape \(5, 7\) .* is no convolution kernel"):
        to_peft(fc, tmp_path / "bad", module_map={"fc": "fc"}, conv="fc")
    assert not (tmp_path / "bad").exists()


def test_module_map_keys_may_keep_a_variables_dicts_params_prefix(tmp_path):
    """A variables dict (params + batch_stats): keys as lorafy/infer_layout print them
    (``params/fc/kernel``) and stripped ones export the same adapter."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    v = {"params": {"fc": {"kernel": jax.random.normal(k1, (5, 7))}},
         "batch_stats": {"bn": {"mean": jnp.zeros(7)}}}
    lp = lora_jax.lorafy(v, rank=3, targets="kernel", key=k2)
    w = lp["params"]["fc"]["kernel"]
    lp["params"]["fc"]["kernel"] = lora_jax.LoraWeight(
        w.w0, w.a, jax.random.normal(k3, w.b.shape), alpha=w.alpha)
    got = [load_file(to_peft(lp, tmp_path / name, module_map={key: "fc"})
                     / "adapter_model.safetensors")
           for name, key in (("prefixed", "params/fc/kernel"), ("plain", "fc/kernel"))]
    assert sorted(got[0]) == sorted(got[1]) == ["base_model.model.fc.lora_A.weight",
                                                 "base_model.model.fc.lora_B.weight"]
    a, b = got[0]["base_model.model.fc.lora_A.weight"], got[0]["base_model.model.fc.lora_B.weight"]
    assert a.shape == (3, 5) and b.shape == (7, 3)                    # PEFT: [r, in], [out, r]
    for key in got[0]:
        np.testing.assert_array_equal(got[0][key], got[1][key])


def test_module_map_keys_of_an_nnx_state_need_no_value_suffix(tmp_path):
    """An NNX State's leaves end in ``/value`` (``fc/kernel/value``): keys with or without it
    export the same adapter, and from_peft puts the factors back onto the State."""
    from flax import nnx

    graphdef, state = nnx.split(nnx.Linear(5, 7, rngs=nnx.Rngs(0)))
    fn = lambda s, x: nnx.merge(graphdef, s)(x)                       # noqa: E731
    x = jnp.ones((2, 5))
    lp = randomize_b(lora_jax.lorafy(state, rank=3, fn=fn, args=(x,)), jax.random.key(1))
    dirs = [to_peft(lp, tmp_path / name, module_map={key: "fc"}, task_type=None)
            for name, key in (("suffixed", "kernel/value"), ("plain", "kernel"))]
    got = [load_file(d / "adapter_model.safetensors") for d in dirs]
    assert sorted(got[0]) == ["base_model.model.fc.lora_A.weight",
                              "base_model.model.fc.lora_B.weight"]
    for key in got[0]:
        np.testing.assert_array_equal(got[0][key], got[1][key])
    back = from_peft(dirs[1], state, module_map={"kernel": "fc"})
    np.testing.assert_allclose(lora_jax.lora(fn)(back, x), lora_jax.lora(fn)(lp, x),
                               rtol=1e-6, atol=1e-6)
