"""Hugging Face checkpoint directories: ``config.json`` and (sharded) safetensors weights.

torch ``nn.Linear`` weights are stored (out, in); they are transposed to the (in, out)
layout of ``nn.Dense`` kernels once, at load time, and the per-layer tensors
``model.layers.{i}.*`` are stacked on a leading layer axis to match the ``nn.scan``-ed
parameter tree of :class:`~lora_jax.models.llama.LlamaForCausalLM`. The names come from
the library's one HF table, :data:`lora_jax.interop.HF_LLAMA_NAMES`; this module adds the
checks against a config (every tensor present, every shape right).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from lora_jax.checkpoint import read_json, read_safetensors
from lora_jax.interop import llama_from_hf
from lora_jax.models.configs import LlamaConfig
from lora_jax.models.llama import LlamaForCausalLM

__all__ = [
    "load_hf_config",
    "load_hf_state_dict",
    "hf_state_dict_to_params",
]

PathLike = str | os.PathLike

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_POS_INT = (lambda v: _is_int(v) and v > 0, "a positive int")
_ID = (lambda v: _is_int(v) and v >= 0, "a non-negative int")
_NUM = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
#: config.json keys LlamaConfig.from_hf reads, and what each must be
_CONFIG_TYPES = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings", "sliding_window"), _POS_INT),
    "max_window_layers": _ID,
    "layer_types": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                    "a list of strings"),
    **dict.fromkeys(("rms_norm_eps", "rope_theta"), _NUM),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"),
                    _BOOL),
    **dict.fromkeys(("model_type", "hidden_act"), (lambda v: isinstance(v, str), "a string")),
    **dict.fromkeys(("rope_scaling", "rope_parameters"),
                    (lambda v: isinstance(v, dict), "an object")),
    "bos_token_id": _ID,
    "eos_token_id": (lambda v: _ID[0](v) or (isinstance(v, list) and all(map(_ID[0], v))),
                     "an int or a list of ints"),
}
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads")


def _check_config(hf, where: Path) -> dict:
    if not isinstance(hf, dict):
        raise ValueError(f"{where} holds a JSON {type(hf).__name__}, not an object.")
    missing = [k for k in _REQUIRED if k not in hf]
    if missing:
        raise ValueError(f"{where} lacks the key(s) {missing} of a Llama config.")
    for key, (ok, want) in _CONFIG_TYPES.items():
        v = hf.get(key)
        if v is not None and not ok(v):
            raise ValueError(f"{where}: key {key!r} is {str(v)[:80]!r} ({type(v).__name__}); "
                             f"it must be {want}.")
    return hf


def load_hf_config(path: PathLike, **overrides) -> LlamaConfig:
    """The :class:`LlamaConfig` of an HF checkpoint directory's ``config.json``.

    A file that is not JSON, lacks a key or has a key of the wrong type is a
    ``ValueError`` naming the file and the key."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{path} has no config.json (and is not a .gguf file)")
    hf = _check_config(read_json(cfg), cfg)
    try:
        return LlamaConfig.from_hf(hf, **overrides)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"{cfg}: {e}") from None


def _weight_map(index: Path) -> dict[str, str]:
    obj = read_json(index)
    wm = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise ValueError(f"{index}: key 'weight_map' must be an object of shard file names.")
    bad = sorted({v for v in wm.values() if Path(v).name != v})
    if bad:
        raise ValueError(f"{index}: key 'weight_map' names shard files outside the directory: "
                         f"{bad[:5]}.")
    return wm


def load_hf_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint dir (``model.safetensors`` or a sharded index).

    Every file is checked before it is read (:func:`lora_jax.checkpoint.read_safetensors`):
    a truncated or corrupted one is a ``ValueError`` naming it.
    """
    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        weight_map = _weight_map(index)
        sd = _load_files(path / shard for shard in sorted(set(weight_map.values())))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise ValueError(f"tensors listed in {index} but absent from shards: {missing}")
        return sd
    others = sorted(path.glob("*.safetensors"))
    if others:
        return _load_files(others)
    raise FileNotFoundError(
        f"no model.safetensors / model.safetensors.index.json in {path} "
        "(only safetensors checkpoints are supported)"
    )


def _load_files(files) -> dict[str, np.ndarray]:
    sd: dict[str, np.ndarray] = {}
    for f in files:
        sd.update(read_safetensors(f))
    return sd


def _convertible(sd: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, np.ndarray]:
    """``sd`` less RoPE buffers and, with tied embeddings, the ``lm_head`` copy."""
    def keep(name: str) -> bool:
        if name.endswith(_IGNORED_SUFFIXES):
            return False
        return not (config.tie_word_embeddings and name.removeprefix("model.") == "lm_head.weight")
    return {name: x for name, x in sd.items() if keep(name)}


def _check_shapes(flat: Mapping[str, np.ndarray], config: LlamaConfig) -> None:
    model = LlamaForCausalLM(config)
    abstract = jax.eval_shape(lambda: model.init_params(jax.random.key(0)))
    expected = {k: tuple(s.shape) for k, s in flatten_dict(abstract, sep="/").items()}
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f"checkpoint does not match config: missing={missing} unexpected={extra}")
    bad = {k: (tuple(flat[k].shape), s) for k, s in expected.items() if tuple(flat[k].shape) != s}
    if bad:
        raise ValueError(f"shape mismatch (got, expected): {bad}")


def hf_state_dict_to_params(
    sd: Mapping[str, np.ndarray], config: LlamaConfig, *, dtype=jnp.float32
) -> dict:
    """Converts HF ``LlamaForCausalLM`` tensors to our (stacked, (in, out)) param tree.

    Unknown tensors, missing tensors and shape mismatches raise ``ValueError``.
    """
    flat = llama_from_hf(_convertible(sd, config), config.num_hidden_layers)
    _check_shapes(flat, config)
    tree = unflatten_dict(flat, sep="/")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float32), dtype), tree)
