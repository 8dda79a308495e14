"""PEFT's modules_to_save: Trainable leaves written by to_peft load in PEFT with equal
logits, PEFT-made ones load here, and the format round trip without torch."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lora_jax as lj
from helpers import SMALL_LLAMA
from lora_jax.interop import from_peft, to_peft

_HAVE_ORACLES = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))
if _HAVE_ORACLES:
    import peft
    import torch
    import transformers
oracle = pytest.mark.skipif(not _HAVE_ORACLES, reason="needs torch, transformers and peft")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

SAVE = ["^lm_head/kernel", "^norm/scale", "layers/input_layernorm/scale"]


def _moved(lp, scale=0.2):
    """Every trainable leaf moved off its initial value, as training would."""
    t, f = lj.split(lp)
    leaves, treedef = jax.tree.flatten(t)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return lj.combine(jax.tree.unflatten(treedef, leaves), f)


def test_modules_to_save_round_trip_without_torch(tmp_path):
    params = {"foo": {"kernel": jnp.ones((5, 7))}, "head": {"kernel": jnp.ones((7, 3))},
              "norm": {"scale": jnp.ones(7)},
              "layers": {"input_layernorm": {"scale": jnp.ones((2, 5))}}}
    lp = _moved(lj.lorafy(params, rank=2, targets="foo",
                          trainable=["head", "norm/scale", "input_layernorm"]))
    mm = {"foo/kernel": "model.foo", "head/kernel": "model.head"}
    out = to_peft(lp, tmp_path / "ad", module_map=mm)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["model.head", "model.layers.0.input_layernorm",
                                      "model.layers.1.input_layernorm", "model.norm"]
    sd = load_file(out / "adapter_model.safetensors")
    np.testing.assert_array_equal(sd["base_model.model.model.head.weight"],
                                  np.asarray(lp["head"]["kernel"].value).T)      # torch (out, in)
    np.testing.assert_array_equal(sd["base_model.model.model.layers.1.input_layernorm.weight"],
                                  lp["layers"]["input_layernorm"]["scale"].value[1])
    back = from_peft(out, params, module_map=mm)
    again = from_peft(out, lp, module_map=mm)
    for tree in (back, again):
        for path in (("head", "kernel"), ("norm", "scale"), ("layers", "input_layernorm", "scale")):
            got, want = tree, lp
            for k in path:
                got, want = got[k], want[k]
            assert isinstance(got, lj.Trainable)
            np.testing.assert_array_equal(got.value, want.value)
    bare = lj.lorafy(params, rank=2, targets="foo", trainable="norm/scale")
    with pytest.raises(ValueError, match="match no leaf"):
        from_peft(out, params, module_map={"foo/kernel": "model.foo"})
    with pytest.raises(ValueError, match="for trainable leaf 'head/kernel'"):
        to_peft(lp, tmp_path / "x", module_map={"foo/kernel": "model.foo"})
    plain = to_peft(lj.lorafy(params, rank=2, targets="foo"), tmp_path / "plain", module_map=mm)
    with pytest.raises(ValueError, match="Trainable leaves the adapter does not save"):
        from_peft(plain, bare, module_map=mm)


def _hf_base(path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**dict(SMALL_LLAMA, num_key_value_heads=1),
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return path


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


# PEFT tests/test_decoder_models.py::test_save_pretrained (modules_to_save=["lm_head"]) and
# tests/test_other.py::TestModulesToSaveNameSubstringBug: the saved module reloads.
@oracle
def test_modules_to_save_export_loads_in_peft_and_peft_adapters_load_here(tmp_path):
    from lora_jax.models import loading
    path = _hf_base(tmp_path / "hf")
    model, params = loading.from_pretrained(path)
    ids = np.random.RandomState(0).randint(0, SMALL_LLAMA["vocab_size"], (2, 13))
    lp = _moved(lj.lorafy(params, rank=4, targets=["q_proj/kernel", "v_proj/kernel"],
                          trainable=SAVE, key=jax.random.key(1)))
    ours = np.asarray(lj.lora(model.apply)({"params": lp}, jnp.asarray(ids)))
    out = to_peft(lp, tmp_path / "ad", base_model_name_or_path=str(path))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "lm_head" in cfg["modules_to_save"] and "model.norm" in cfg["modules_to_save"]
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    pm = peft.PeftModel.from_pretrained(hf, out).eval()
    np.testing.assert_allclose(_torch_logits(pm, ids), ours, atol=1e-4, rtol=0)
    back = from_peft(out, params)
    np.testing.assert_allclose(lj.lora(model.apply)({"params": back}, jnp.asarray(ids)), ours,
                               atol=1e-5)

    # A PEFT-made adapter with modules_to_save (PEFT's own key format) loads here.
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    pm = peft.get_peft_model(hf, peft.LoraConfig(target_modules=["k_proj"], r=2,
                                                 modules_to_save=["lm_head", "model.norm"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.eval().save_pretrained(tmp_path / "made")
    theirs = _torch_logits(pm, ids)
    got = from_peft(tmp_path / "made", params)
    assert isinstance(got["lm_head"]["kernel"], lj.Trainable)
    np.testing.assert_allclose(lj.lora(model.apply)({"params": got}, jnp.asarray(ids)), theirs,
                               atol=1e-4)
