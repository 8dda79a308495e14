"""Mistral, Qwen2 and Qwen3 run on the Llama decoder: transformers' own models are the oracle
for the logits (a sliding window shorter than the sequence, q/k/v biases, per-head q/k norms),
the KV cache, a merged export and a PEFT adapter trained here."""

import dataclasses
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from helpers import SMALL_LLAMA, random_hf_llama, randomize_b
from lora_jax.interop import export_merged, to_peft
from lora_jax.models import LlamaConfig, LlamaForCausalLM, from_pretrained, init_cache

_HAVE_ORACLES = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
oracle = pytest.mark.skipif(not _HAVE_ORACLES, reason="needs torch, transformers and peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

WINDOW = 7   # shorter than the 23-token sequences below, so the window masks keys
FAMILY = {   # name: (transformers prefix, config.json extras, the window every layer uses)
    "mistral-window": ("Mistral", dict(sliding_window=WINDOW), WINDOW),
    "mistral": ("Mistral", dict(sliding_window=None), None),
    "qwen2": ("Qwen2", dict(use_sliding_window=False, sliding_window=WINDOW), None),
    "qwen2-window": ("Qwen2", dict(use_sliding_window=True, sliding_window=WINDOW,
                                   max_window_layers=0), WINDOW),
    "qwen3": ("Qwen3", dict(attention_bias=False), None),
}
TARGETS = r"(self_attn|mlp)/\w+_proj/kernel"


def _ids(batch=2, length=23, seed=0):
    return np.random.RandomState(seed).randint(0, SMALL_LLAMA["vocab_size"], (batch, length))


def _logits(torch, model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(FAMILY))
def family(request, tmp_path_factory):
    """(name, HF model, its directory, our model, our params)."""
    import torch
    import transformers
    arch, extra, _ = FAMILY[request.param]
    hf = random_hf_llama(torch, transformers, arch=arch, num_hidden_layers=3, **extra)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    model, params = from_pretrained(path)
    return request.param, hf, path, model, params


@oracle
def test_logits_match_transformers(family):
    import torch
    name, hf, _, model, params = family
    cfg = model.config
    assert cfg.model_type == name.split("-")[0]
    assert cfg.sliding_window == FAMILY[name][2]
    attn = params["layers"]["self_attn"]
    assert ("bias" in attn["q_proj"]) == (name.startswith("qwen2"))
    assert "bias" not in attn["o_proj"]
    assert ("q_norm" in attn) == (name == "qwen3")
    if name == "qwen3":
        assert attn["k_norm"]["scale"].shape == (3, 6)                  # [L, head_dim]
        np.testing.assert_array_equal(attn["k_norm"]["scale"][2],
                                      hf.model.layers[2].self_attn.k_norm.weight.detach())
    ids = _ids()
    ref = _logits(torch, hf, ids)
    out = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    if cfg.sliding_window:   # the window matters here: without it the logits differ
        full = LlamaForCausalLM(dataclasses.replace(cfg, sliding_window=None))
        unwindowed = np.asarray(full.apply({"params": params}, jnp.asarray(ids)))
        assert np.abs(unwindowed - ref).max() > 1e-2


@oracle
def test_kv_cache_steps_match_the_full_forward(family):
    """Prefill, then one token at a time past the window: the cache path masks what the full
    forward masks."""
    _, _, _, model, params = family
    ids = jnp.asarray(_ids(seed=3))
    fwd = jax.jit(model.apply)
    full = fwd({"params": params}, ids)
    cache = init_cache(model.config, 2, 32)
    parts, cache = [], cache
    for lo, hi in ((0, 9), (9, 10), (10, 11), (11, 23)):
        logits, cache = fwd({"params": params}, ids[:, lo:hi], cache=cache)
        parts.append(logits)
    np.testing.assert_allclose(jnp.concatenate(parts, axis=1), full, atol=1e-4, rtol=1e-5)


@oracle
def test_merged_export_and_peft_adapter_load_in_transformers(family, tmp_path):
    """A LoRA on all seven projections: the merged export loads as the same transformers class
    and the PEFT adapter loads onto the original model, both with our logits."""
    import peft
    import torch
    import transformers
    name, hf, path, model, params = family
    lp = lj.lorafy(params, rank=3, alpha=5.0, targets=TARGETS, key=jax.random.key(1))
    lp = randomize_b(lp, jax.random.key(2))
    ids = _ids(seed=5)
    ours = np.asarray(lj.lora(model.apply)({"params": lp}, jnp.asarray(ids)))
    assert np.abs(ours - _logits(torch, hf, ids)).max() > 1e-2   # the adapter matters

    merged_dir = tmp_path / "merged"
    export_merged(lp, merged_dir)
    (merged_dir / "config.json").write_text(json.dumps(model.config.to_hf()))
    back = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(back).__name__ == type(hf).__name__
    np.testing.assert_allclose(_logits(torch, back, ids), ours, atol=1e-4, rtol=0)

    out = to_peft(lp, tmp_path / "adapter", base_model_name_or_path=str(path))
    reloaded = type(hf).from_pretrained(path).eval()
    pm = peft.PeftModel.from_pretrained(reloaded, out).eval()
    np.testing.assert_allclose(_logits(torch, pm, ids), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type,extra", [
    ("llama", {}), ("mistral", {"sliding_window": 4096}), ("mistral", {}),
    ("qwen2", {}), ("qwen2", {"sliding_window": 5}), ("qwen3", {"attention_bias": True}),
])
def test_config_round_trips_through_config_json(model_type, extra):
    cfg = LlamaConfig(**SMALL_LLAMA, model_type=model_type, **extra)
    hf = cfg.to_hf()
    assert hf["model_type"] == model_type and hf["architectures"][0].endswith("ForCausalLM")
    assert LlamaConfig.from_hf(json.loads(json.dumps(hf))) == cfg
    assert cfg.qkv_bias == (model_type == "qwen2" or extra.get("attention_bias", False))


@pytest.mark.parametrize("hf,match", [
    ({"model_type": "gemma"}, r"unsupported model_type 'gemma' \(supported: \['llama', "
                              r"'mistral', 'qwen2', 'qwen3'\]"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 4,
      "max_window_layers": 1}, r"mixes sliding-window and full-attention layers"),
    ({"model_type": "qwen3", "sliding_window": 4,
      "layer_types": ["full_attention", "sliding_attention", "full_attention"]},
     r"mixes sliding-window and full-attention layers"),
])
def test_configs_this_decoder_cannot_run_are_named(hf, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf({**SMALL_LLAMA, **hf})


def test_a_window_on_a_llama_config_is_refused():
    with pytest.raises(ValueError, match="sliding_window needs model_type"):
        LlamaConfig(**SMALL_LLAMA, sliding_window=4)
    with pytest.raises(ValueError, match="unsupported model_type 'phi3'"):
        LlamaConfig(**SMALL_LLAMA, model_type="phi3")
