"""llama.cpp GGUF LoRA adapter export: the file read back (metadata, tensors), and base + adapter
applied as llama.cpp applies it (``W + alpha / r * lora_b @ lora_a`` on the GGUF tensors,
llama.cpp ``llm_build_lora_mm``) gives the merged model's logits through our GGUF loader.
No torch: the tiny base is our own random Llama written as GGUF."""

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from helpers import SMALL_LLAMA, randomize_ab
from lora_jax.interop import llama_to_hf
from lora_jax.interop.gguf_lora import permute_rope
from lora_jax.models import LlamaConfig, LlamaForCausalLM, from_pretrained
from lora_jax.models.gguf import gguf_field, open_gguf

_HF_TO_GGUF = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}


def _gguf_tensors(params, cfg):
    """Our params -> llama.cpp tensor names and layout (q/k rows permuted), float32."""
    flat = {lj.core.path_str(k): np.asarray(v, np.float32)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = {}
    for name, t in llama_to_hf(flat).items():
        if name in _GLOBAL:
            out[_GLOBAL[name]] = t
            continue
        i, rest = name.split(".", 3)[2:]
        if rest.startswith("self_attn.q_proj"):
            t = permute_rope(t, cfg.num_attention_heads)
        elif rest.startswith("self_attn.k_proj"):
            t = permute_rope(t, cfg.num_key_value_heads)
        out[f"blk.{i}.{_HF_TO_GGUF[rest]}"] = np.ascontiguousarray(t)
    return out


def _write_base(path, tensors, cfg):
    w = gguf.GGUFWriter(str(path), "llama")
    for add, v in ((w.add_block_count, cfg.num_hidden_layers),
                   (w.add_context_length, cfg.max_position_embeddings),
                   (w.add_embedding_length, cfg.hidden_size),
                   (w.add_feed_forward_length, cfg.intermediate_size),
                   (w.add_head_count, cfg.num_attention_heads),
                   (w.add_head_count_kv, cfg.num_key_value_heads),
                   (w.add_key_length, cfg.head_dim), (w.add_value_length, cfg.head_dim),
                   (w.add_rope_dimension_count, cfg.head_dim), (w.add_vocab_size, cfg.vocab_size),
                   (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
                   (w.add_rope_freq_base, cfg.rope_theta)):
        add(v)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = LlamaConfig(**{**SMALL_LLAMA, "num_hidden_layers": 2, "num_key_value_heads": 1})
    params = LlamaForCausalLM(cfg).init_params(jax.random.key(0))
    params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape),
                          params)
    path = tmp_path_factory.mktemp("gguf") / "base.gguf"
    _write_base(path, _gguf_tensors(params, cfg), cfg)
    return path


def _adapter(params):
    lp = lj.lorafy(params, rank=3, alpha=5.0, targets=["q_proj|k_proj|v_proj|o_proj|down_proj|"
                                                      "lm_head"],
                   alpha_pattern={"down_proj": 9.0}, rank_pattern={"o_proj": 2})
    return randomize_ab(lp, jax.random.key(2), scale=0.3)


def _read(path):
    r = open_gguf(path)
    meta = {k: gguf_field(r, k) for k in ("general.type", "general.architecture",
                                          "adapter.type", "adapter.lora.alpha")}
    return meta, {t.name: np.array(t.data) for t in r.tensors}


def test_gguf_lora_reads_back_exactly(base, tmp_path):
    model, params = from_pretrained(base)
    lp = _adapter(params)
    out = lj.to_gguf_lora(lp, tmp_path / "adapter.gguf", base_gguf=base)
    meta, tensors = _read(out)
    assert meta == {"general.type": "adapter", "general.architecture": "llama",
                    "adapter.type": "lora", "adapter.lora.alpha": 5.0}
    assert len(tensors) == 2 * (2 * 5 + 1)              # 5 adapted kinds x 2 layers + lm_head
    q = lp["layers"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight.lora_a"], np.asarray(q.a[1]).T)
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight.lora_b"],
                                  permute_rope(np.asarray(q.b[1]).T, 5))
    v = lp["layers"]["self_attn"]["v_proj"]["kernel"]
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_b"], np.asarray(v.b[0]).T)
    # down_proj has alpha 9 (scale 3); the file's alpha is 5 (scale 5/3): B carries 9/5
    d = lp["layers"]["mlp"]["down_proj"]["kernel"]
    np.testing.assert_allclose(tensors["blk.0.ffn_down.weight.lora_b"],
                               np.asarray(d.b[0]).T * 9.0 / 5.0, rtol=1e-6)
    assert tensors["blk.0.attn_output.weight.lora_a"].shape == (2, 30)     # rank 2
    h = lp["lm_head"]["kernel"]
    np.testing.assert_array_equal(tensors["output.weight.lora_a"], np.asarray(h.a).T)


def _apply_like_llama_cpp(base_tensors, adapter, alpha):
    out = dict(base_tensors)
    for name in (n.removesuffix(".lora_a") for n in adapter if n.endswith(".lora_a")):
        la, lb = adapter[f"{name}.lora_a"], adapter[f"{name}.lora_b"]
        out[name] = base_tensors[name] + alpha / lb.shape[1] * (lb @ la)
    return out


@pytest.mark.parametrize("dtype,tol", [("f32", 1e-4), ("f16", 2e-2)])
def test_gguf_lora_applied_like_llama_cpp_equals_merged_logits(base, tmp_path, dtype, tol):
    model, params = from_pretrained(base)
    lp = _adapter(params)
    cfg = model.config
    out = lj.to_gguf_lora(lp, tmp_path / "a.gguf", config=cfg, dtype=dtype)
    meta, adapter = _read(out)
    assert adapter["blk.0.attn_k.weight.lora_b"].dtype == (np.float32 if dtype == "f32"
                                                          else np.float16)
    base_tensors = _read(base)[1]
    merged = _apply_like_llama_cpp(base_tensors,
                                   {k: v.astype(np.float32) for k, v in adapter.items()},
                                   meta["adapter.lora.alpha"])
    _write_base(tmp_path / "merged.gguf", merged, cfg)
    m2, p2 = from_pretrained(tmp_path / "merged.gguf")
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 13)))
    want = model.apply({"params": lj.merge(lp)}, ids)
    got = m2.apply({"params": p2}, ids)
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got - want).max()) <= tol * max(1.0, scale)
    # the adapter matters: the base alone is far off
    assert float(jnp.abs(model.apply({"params": params}, ids) - want).max()) > 100 * tol


def test_gguf_lora_refusals(base, tmp_path):
    model, params = from_pretrained(base)
    lp = _adapter(params)
    out = lj.to_gguf_lora(lp, tmp_path / "a.gguf", base_gguf=base)
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="^to_gguf_lora: .*a.gguf exists; nothing was"):
        lj.to_gguf_lora(lp, out, base_gguf=base)
    assert out.read_bytes() == before
    lj.to_gguf_lora(lp, out, base_gguf=base, alpha=3.0, overwrite=True)
    assert _read(out)[0]["adapter.lora.alpha"] == 3.0
    with pytest.raises(ValueError, match="^to_gguf_lora: q/k adapters need the head counts"):
        lj.to_gguf_lora(lp, tmp_path / "b.gguf")
    other = LlamaForCausalLM(LlamaConfig(**{**SMALL_LLAMA, "num_hidden_layers": 2,
                                            "num_key_value_heads": 1, "hidden_size": 25}))
    small = lj.lorafy(other.init_params(jax.random.key(0)), rank=2, targets="v_proj")
    with pytest.raises(ValueError, match=r"^to_gguf_lora: tensor 'blk.0.attn_v.weight' is "
                                         r"\(6, 35\) in the base GGUF"):
        lj.to_gguf_lora(small, tmp_path / "c.gguf", base_gguf=base)
    with pytest.raises(ValueError, match="^to_gguf_lora: leaf 'foo/kernel' has no llama.cpp"):
        lj.to_gguf_lora(lj.lorafy({"foo": {"kernel": jnp.ones((5, 7))}}, rank=2),
                        tmp_path / "d.gguf")
    with pytest.raises(ValueError, match="^to_gguf_lora: dtype 'q8_0' is not supported"):
        lj.to_gguf_lora(lp, tmp_path / "e.gguf", config=model.config, dtype="q8_0")
    with pytest.raises(ValueError, match="^to_gguf_lora: params contain no LoraWeight"):
        lj.to_gguf_lora(params, tmp_path / "f.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]   # nothing half-written


def test_gguf_lora_folds_rslora_scale():
    k = jax.random.key(0)
    node = lj.lorafy({"lm_head": {"kernel": jax.random.normal(k, (5, 7))}}, rank=4, alpha=2.0,
                     rslora=True)
    node = randomize_ab(node, k)
    from lora_jax.interop.gguf_lora import _leaves, _tensors
    t = _tensors(_leaves(node, lj.interop.gguf_lora.GGUF_LLAMA_NAMES), 2.0, None, np.float32)
    w = node["lm_head"]["kernel"]
    delta = 2.0 / 4 * t["output.weight.lora_b"] @ t["output.weight.lora_a"]   # llama.cpp's
    np.testing.assert_allclose(delta, np.asarray(w.scale * w.a @ w.b).T, rtol=1e-5, atol=1e-6)
    assert dataclasses.is_dataclass(w)
