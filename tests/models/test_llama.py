"""Reference Llama: HF parity (safetensors, sharded, tied, llama3 RoPE), GGUF, KV-cache
generation and the embedded SmolLM2-135M-Instruct model."""

import json
import math

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import SMALL_LLAMA, random_hf_llama
from lora_jax.models import (
    LlamaConfig,
    LlamaForCausalLM,
    format_chatml,
    from_pretrained,
    generate,
    hf_state_dict_to_params,
    init_cache,
    llama_config,
    load_tokenizer,
    rope_inv_freq,
)
from lora_jax.models.gguf import unpermute_rope

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def _hf_model(torch, transformers, *, kv_heads, tie, rope_scaling=None, seed=0):
    return random_hf_llama(torch, transformers, seed=seed, num_hidden_layers=3,
                           max_position_embeddings=128, num_key_value_heads=kv_heads,
                           tie_word_embeddings=tie, rope_scaling=rope_scaling)


def _ids(batch=2, length=37, seed=0):
    return np.random.RandomState(seed).randint(0, SMALL_LLAMA["vocab_size"], (batch, length))


def _hf_logits(torch, model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def torch_tf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return torch, transformers


@pytest.mark.parametrize(
    "kv_heads,tie,rope_scaling,shard",
    [
        (1, False, None, None),
        (5, True, None, None),
        (1, False, LLAMA3_ROPE, None),
        (1, True, LLAMA3_ROPE, "20KB"),
    ],
    ids=["gqa-untied", "mha-tied", "llama3-rope", "sharded-tied-llama3"],
)
def test_hf_parity(torch_tf, tmp_path, kv_heads, tie, rope_scaling, shard):
    torch, transformers = torch_tf
    hf = _hf_model(torch, transformers, kv_heads=kv_heads, tie=tie, rope_scaling=rope_scaling)
    kwargs = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(tmp_path, **kwargs)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = _ids(length=40)  # positions beyond original_max_position_embeddings=16
    ref = _hf_logits(torch, hf, ids)

    model, params = from_pretrained(tmp_path)
    cfg = model.config
    assert cfg.num_key_value_heads == kv_heads and cfg.head_dim == 6
    assert cfg.tie_word_embeddings == tie
    assert ("lm_head" in params) == (not tie)
    L, D, V = 3, 35, 97
    assert params["embed_tokens"]["embedding"].shape == (V, D)
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (L, D, 30)
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (L, D, kv_heads * 6)
    assert params["layers"]["self_attn"]["o_proj"]["kernel"].shape == (L, 30, D)
    assert params["layers"]["mlp"]["down_proj"]["kernel"].shape == (L, 33, D)
    assert params["layers"]["input_layernorm"]["scale"].shape == (L, D)
    # (in, out) layout: layer 1's q kernel is the transposed torch weight.
    np.testing.assert_array_equal(
        np.asarray(params["layers"]["self_attn"]["q_proj"]["kernel"][1]),
        hf.model.layers[1].self_attn.q_proj.weight.detach().numpy().T,
    )

    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    assert out.dtype == np.float32 and out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_llama3_inv_freq_matches_transformers(torch_tf):
    torch, transformers = torch_tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = transformers.LlamaConfig(
        **SMALL_LLAMA, num_key_value_heads=1, rope_scaling=dict(LLAMA3_ROPE)
    )
    ref, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    assert attention_factor == 1.0
    ours = rope_inv_freq(LlamaConfig.from_hf(hf_cfg.to_dict()))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)
    # The scaling actually changes something at these sizes (low and high bands).
    plain = rope_inv_freq(LlamaConfig(**{**SMALL_LLAMA, "num_key_value_heads": 1}))
    assert not np.allclose(ours, plain)


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF -> GGUF, convert_hf_to_gguf.py ``permute``)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _write_gguf(path, hf, *, rope_scaling=None):
    """Writes the HF model to an F32 GGUF the way llama.cpp's converter does."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(SMALL_LLAMA["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in hf.state_dict().items()}
    names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    if rope_scaling is not None:  # llama.cpp stores llama3 scaling as per-frequency factors
        hd = c.head_dim
        freqs = 1.0 / (SMALL_LLAMA["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd))
        f, lo, hi = (rope_scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = rope_scaling["original_max_position_embeddings"]
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < old / hi:
                factors.append(1.0)
            elif wavelen > old / lo:
                factors.append(f)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                factors.append(1 / ((1 - smooth) / f + smooth))
        w.add_tensor("rope_freqs.weight", np.asarray(factors, np.float32))
    for i in range(c.num_hidden_layers):
        for hf_name, gg_name in names.items():
            t = sd[f"model.layers.{i}.{hf_name}"]
            if hf_name.startswith("self_attn.q_proj"):
                t = permute_rope(t, c.num_attention_heads)
            elif hf_name.startswith("self_attn.k_proj"):
                t = permute_rope(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg_name}", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(
    "kv_heads,tie,rope_scaling",
    [(1, False, None), (5, True, None), (1, True, LLAMA3_ROPE)],
    ids=["gqa-untied", "mha-tied", "llama3-rope-freqs"],
)
def test_gguf_parity(torch_tf, tmp_path, kv_heads, tie, rope_scaling):
    torch, transformers = torch_tf
    hf = _hf_model(torch, transformers, kv_heads=kv_heads, tie=tie, rope_scaling=rope_scaling,
                   seed=1)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, hf, rope_scaling=rope_scaling)
    ids = _ids(length=40, seed=1)
    ref = _hf_logits(torch, hf, ids)
    model, params = from_pretrained(path)
    assert model.config.tie_word_embeddings == tie
    assert model.config.num_key_value_heads == kv_heads
    assert (model.config.rope_freq_factors is not None) == (rope_scaling is not None)
    out = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_rope_permutation_roundtrip():
    w = np.arange(4 * 6 * 5, dtype=np.float32).reshape(24, 5)
    p = permute_rope(w, 4)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_rope(p, 4), w)
    # one head of 8 rows: llama.cpp interleaves the halves (0..3 | 4..7) into RoPE pairs
    np.testing.assert_array_equal(permute_rope(np.arange(8), 1), [0, 4, 1, 5, 2, 6, 3, 7])


def test_config_from_hf_v4_and_v5_styles():
    v4 = dict(
        model_type="llama", vocab_size=97, hidden_size=35, intermediate_size=33,
        num_hidden_layers=3, num_attention_heads=5, num_key_value_heads=1, head_dim=6,
        rope_theta=500.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=True,
    )
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**LLAMA3_ROPE, "rope_theta": 500.0}
    a, b = LlamaConfig.from_hf(v4), LlamaConfig.from_hf(v5)
    assert a == b and hash(a) == hash(b)
    assert a.rope_type == "llama3" and a.rope_theta == 500.0
    assert a.rope_scaling_dict == LLAMA3_ROPE
    # default head_dim = hidden / heads
    c = LlamaConfig.from_hf({**v4, "hidden_size": 40, "head_dim": None, "rope_scaling": None})
    assert c.head_dim == 8 and c.rope_type == "default"
    with pytest.raises(ValueError, match="even head_dim"):
        LlamaConfig.from_hf({**v4, "head_dim": 7})
    with pytest.raises(NotImplementedError, match="yarn"):
        LlamaConfig.from_hf({**v4, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    assert LlamaConfig.from_hf(json.loads(json.dumps(a.to_hf()))) == a


def test_llama_config_by_name():
    cfg = llama_config("Llama-3-8B", remat=True)
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.num_groups) == (8, 4096 // 32, 32 // 8)
    assert cfg.rope_theta == 500000.0 and cfg.remat
    with pytest.raises(ValueError, match="Llama-2-7B"):   # the error lists the known names
        llama_config("Llama-9")


def test_loader_rejects_unknown_and_missing(tiny):
    model, params = tiny
    cfg = model.config
    sd = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"])}
    with pytest.raises(ValueError, match="missing"):
        hf_state_dict_to_params(sd, cfg)
    with pytest.raises(ValueError, match=r"unexpected .*'model\.foo\.weight'"):
        hf_state_dict_to_params({**sd, "model.foo.weight": np.zeros(3)}, cfg)


# ---------------------------------------------------------------------------------------
# Model structure / decoding (no torch needed)
# ---------------------------------------------------------------------------------------


def test_sharded_bf16_checkpoint_dir(tiny, tmp_path):
    """An HF dir in bf16 over two shards loads as the bf16-rounded tree (no torch)."""
    import ml_dtypes
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    from lora_jax.interop import llama_to_hf

    model, params = tiny
    # save_file writes an array's buffer as if it were C-ordered: the transposes must be copied
    sd = {k: np.ascontiguousarray(np.asarray(v).astype(ml_dtypes.bfloat16))
          for k, v in llama_to_hf(flatten_dict(params, sep="/")).items()}
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(tmp_path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))

    loaded_model, loaded = from_pretrained(tmp_path)
    assert loaded_model.config == model.config
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32),
                           params)
    assert jax.tree.structure(loaded) == jax.tree.structure(rounded)
    for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(rounded)):
        np.testing.assert_array_equal(np.asarray(got), want)
    # layer 2's (out, in) torch weight is the transpose of our stacked kernel's [2]
    np.testing.assert_array_equal(
        np.asarray(loaded["layers"]["mlp"]["down_proj"]["kernel"][2]),
        sd["model.layers.2.mlp.down_proj.weight"].astype(np.float32).T)

    extra = {**weight_map, "model.extra.weight": next(iter(shards))}
    index.write_text(json.dumps({"weight_map": extra}))
    with pytest.raises(ValueError, match="model.extra.weight"):
        from_pretrained(tmp_path)


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(**{**SMALL_LLAMA, "num_key_value_heads": 1, "rope_scaling": LLAMA3_ROPE})
    model = LlamaForCausalLM(cfg)
    params = model.init_params(jax.random.key(1))
    params = jax.tree_util.tree_map(  # bigger weights => peaked, tie-free argmax
        lambda p: p * jnp.asarray(10.0, p.dtype) if p.ndim > 1 and p.shape[-2:] != (97, 35) else p,
        params,
    )
    return model, params


def test_param_tree_contract(tiny):
    model, params = tiny
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
    assert shapes == {
        "embed_tokens": {"embedding": (97, 35)},
        "layers": {
            "input_layernorm": {"scale": (3, 35)},
            "self_attn": {
                "q_proj": {"kernel": (3, 35, 30)},
                "k_proj": {"kernel": (3, 35, 6)},
                "v_proj": {"kernel": (3, 35, 6)},
                "o_proj": {"kernel": (3, 30, 35)},
            },
            "post_attention_layernorm": {"scale": (3, 35)},
            "mlp": {
                "gate_proj": {"kernel": (3, 35, 33)},
                "up_proj": {"kernel": (3, 35, 33)},
                "down_proj": {"kernel": (3, 33, 35)},
            },
        },
        "norm": {"scale": (35,)},
        "lm_head": {"kernel": (35, 97)},
    }
    tied = LlamaForCausalLM(LlamaConfig(**{**SMALL_LLAMA, "tie_word_embeddings": True}))
    assert "lm_head" not in tied.init_params(jax.random.key(0))


def test_remat_and_bf16(tiny):
    model, params = tiny
    ids = jnp.asarray(_ids(length=9))
    ref = jax.jit(model.apply)({"params": params}, ids)
    remat = LlamaForCausalLM(dataclass_replace(model.config, remat=True))
    np.testing.assert_allclose(jax.jit(remat.apply)({"params": params}, ids), ref, atol=1e-5)

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, ids))

    g1 = jax.jit(jax.grad(lambda p: loss(model, p)))(params)
    g2 = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    # Same math, different op order: compare relative to each leaf's scale.
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3 * float(jnp.abs(a).max())), g1, g2
    )

    bf = LlamaForCausalLM(dataclass_replace(model.config, dtype=jnp.bfloat16))
    out = jax.jit(bf.apply)({"params": params}, ids)
    assert out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_cache_prefill_and_step_match_full_forward(tiny):
    model, params = tiny
    ids = jnp.asarray(_ids(batch=2, length=11, seed=3))
    fwd = jax.jit(model.apply)
    full = fwd({"params": params}, ids)
    cache = init_cache(model.config, 2, 16)
    logits_a, cache = fwd({"params": params}, ids[:, :7], cache=cache)
    assert int(cache["index"]) == 7
    logits_b, cache = fwd({"params": params}, ids[:, 7:8], cache=cache)
    logits_c, cache = fwd({"params": params}, ids[:, 8:], cache=cache)
    assert int(cache["index"]) == 11
    got = jnp.concatenate([logits_a, logits_b, logits_c], axis=1)
    np.testing.assert_allclose(got, full, atol=1e-4, rtol=1e-5)


def test_attention_mask_padding(tiny):
    model, params = tiny
    ids = jnp.asarray(_ids(batch=1, length=8, seed=4))
    fwd = jax.jit(model.apply)
    ref = fwd({"params": params}, ids)
    padded = jnp.concatenate([ids, jnp.zeros((1, 3), jnp.int32)], axis=1)
    mask = jnp.asarray([[1] * 8 + [0] * 3])
    out = fwd({"params": params}, padded, attention_mask=mask)
    np.testing.assert_allclose(out[:, :8], ref, atol=1e-5)


def _greedy_reference(model, params, prompt, n):
    """Greedy decoding by repeated full (uncached) forward passes.

    The sequence lives in a fixed-size buffer so one compiled forward serves every
    step; with a causal model the logits at position t only see tokens <= t.
    """
    fwd = jax.jit(model.apply)
    b, t0 = prompt.shape
    buf = np.zeros((b, t0 + n), np.int32)
    buf[:, :t0] = prompt
    for t in range(t0, t0 + n):
        logits = fwd({"params": params}, jnp.asarray(buf))
        buf[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
    return buf


def test_generate_greedy_matches_full_forward_argmax(tiny):
    model, params = tiny
    prompt = _ids(batch=2, length=5, seed=5)
    out = np.asarray(generate(model, params, prompt, 12))
    ref = _greedy_reference(model, params, prompt, 12)
    assert out.shape == (2, 17)
    np.testing.assert_array_equal(out, ref)
    assert len(set(ref[0, 5:].tolist())) > 1  # not a degenerate constant sequence
    # 1-D prompt and a custom apply_fn wrapper (what lora(model.apply) plugs into).
    calls = []

    def apply_fn(variables, *args, **kwargs):
        calls.append(1)
        return model.apply(variables, *args, **kwargs)

    out1 = np.asarray(generate(model, params, prompt[0], 12, apply_fn=apply_fn))
    np.testing.assert_array_equal(out1, ref[0])
    assert calls  # traced through the wrapper


def test_generate_eos_and_sampling(tiny):
    model, params = tiny
    prompt = _ids(batch=1, length=5, seed=6)
    ref = _greedy_reference(model, params, prompt, 8)
    eos = int(ref[0, 5 + 2])  # the 3rd generated token
    first = int(np.argmax(ref[0, 5:] == eos))
    out = np.asarray(generate(model, params, prompt, 8, eos_id=eos))
    np.testing.assert_array_equal(out[0, : 5 + first + 1], ref[0, : 5 + first + 1])
    assert (out[0, 5 + first :] == eos).all()

    s1 = generate(model, params, prompt, 8, temperature=1.0, key=jax.random.key(0))
    s2 = generate(model, params, prompt, 8, temperature=1.0, key=jax.random.key(0))
    np.testing.assert_array_equal(s1, s2)
    assert ((np.asarray(s1) >= 0) & (np.asarray(s1) < 97)).all()
    with pytest.raises(ValueError, match="key"):
        generate(model, params, prompt, 2, temperature=0.5)


def test_chatml_formatter():
    msgs = [{"role": "user", "content": "Hi"}]
    assert format_chatml(msgs) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert format_chatml(msgs, add_generation_prompt=False, default_system="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    sys_first = [{"role": "system", "content": "X"}] + msgs
    assert format_chatml(sys_first, default_system="S").startswith(
        "<|im_start|>system\nX<|im_end|>\n"
    )


# ---------------------------------------------------------------------------------------
# Embedded default model
# ---------------------------------------------------------------------------------------


def test_smollm2_answers_paris(tmp_path):
    from lora_jax.models import smollm2

    path = smollm2.default_model_path()
    assert path.stat().st_size == smollm2.GGUF_SIZE
    model, params = from_pretrained(path)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (30, 576, 9)
    assert cfg.num_key_value_heads == 3 and cfg.tie_word_embeddings
    tok = load_tokenizer(path)
    assert tok.token_to_id("<|im_start|>") == 1 and tok.eos_id == 2
    assert tok.decode(tok.encode("Hello, world! 123")) == "Hello, world! 123"

    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids[0] == 1 and ids.count(1) == 3  # <|im_start|> is one special token
    out = np.asarray(generate(model, params, ids, 20, eos_id=tok.eos_id))
    answer = tok.decode(out[len(ids) :])
    assert "Paris" in answer, answer

    # The same tokenizer saved as tokenizer.json (+ tokenizer_config.json) reloads equal.
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": tok.chat_template, "eos_token": "<|im_end|>",
                    "bos_token": "<|im_start|>"})
    )
    tok2 = load_tokenizer(tmp_path)
    assert (tok2.bos_id, tok2.eos_id) == (1, 2)
    assert tok2.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                    tokenize=True) == ids
