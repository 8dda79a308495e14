"""Hugging Face checkpoint directories: ``config.json`` and (sharded) safetensors weights.

torch ``nn.Linear`` weights are stored (out, in); they are transposed to the (in, out)
layout of ``nn.Dense`` kernels once, at load time, and the per-layer tensors
``model.layers.{i}.*`` are stacked on a leading layer axis to match the ``nn.scan``-ed
parameter tree of :class:`~lora_jax.models.llama.LlamaForCausalLM`. The names come from
the library's one HF table, :data:`lora_jax.interop.HF_LLAMA_NAMES`; this module adds the
checks against a config (every tensor present, every shape right).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file

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


def load_hf_config(path: PathLike, **overrides) -> LlamaConfig:
    """The :class:`LlamaConfig` of an HF checkpoint directory's ``config.json``."""
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        raise FileNotFoundError(f"{path} has no config.json (and is not a .gguf file)")
    return LlamaConfig.from_hf(json.loads(cfg.read_text()), **overrides)


def load_hf_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint dir (``model.safetensors`` or a sharded index).

    Arrays are memory-mapped by ``safetensors``; bf16 / fp8 come back as ``ml_dtypes``.
    """
    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return load_file(single)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        sd = _load_files(path / shard for shard in sorted(set(weight_map.values())))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise ValueError(f"tensors listed in {index.name} but absent from shards: {missing}")
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
        sd.update(load_file(f))
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
