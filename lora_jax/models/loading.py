"""Loading a Llama by path: an HF checkpoint directory or a GGUF file -> ``(model, params)``.

The path decides the reader: a ``.gguf`` file (or any file with the GGUF magic bytes) goes
through :mod:`lora_jax.models.gguf`, a directory with ``config.json`` through
:mod:`lora_jax.models.hf`; both end in the same HF -> ours conversion. Tokenizers load by
path the same way (:func:`lora_jax.models.tokenizer.load_tokenizer`).

Example::

    model, params = from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
    model, params = from_pretrained("llama-dir/", dtype=jnp.bfloat16, remat=True)
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from lora_jax.models.configs import LlamaConfig
from lora_jax.models.gguf import gguf_config, gguf_to_hf_state_dict, is_gguf, open_gguf
from lora_jax.models.hf import hf_state_dict_to_params, load_hf_config, load_hf_state_dict
from lora_jax.models.llama import LlamaForCausalLM

__all__ = ["from_pretrained", "load_config"]

PathLike = str | os.PathLike


def load_config(path: PathLike, **overrides) -> LlamaConfig:
    """The :class:`LlamaConfig` of an HF checkpoint dir or a GGUF file."""
    if is_gguf(path):
        return gguf_config(open_gguf(path), **overrides)
    return load_hf_config(path, **overrides)


def from_pretrained(
    path: PathLike, *, dtype=jnp.float32, compute_dtype=None, remat: bool = False
) -> tuple[LlamaForCausalLM, dict]:
    """Loads ``(model, params)`` from an HF checkpoint directory or a ``.gguf`` file.

    Args:
      path: directory with ``config.json`` + ``model.safetensors`` (or sharded with
        ``model.safetensors.index.json``), or a ``.gguf`` file (any quantization the
        ``gguf`` package can dequantize; tensors are dequantized to float).
      dtype: parameter dtype (``param_dtype``); also the compute dtype unless
        ``compute_dtype`` is given.
      remat: rematerialize each layer in the backward pass.
    """
    path = Path(path)
    compute_dtype = dtype if compute_dtype is None else compute_dtype
    overrides = dict(dtype=compute_dtype, param_dtype=dtype, remat=remat)
    if is_gguf(path):
        reader = open_gguf(path)
        config = gguf_config(reader, **overrides)
        sd = gguf_to_hf_state_dict(reader, config)
    else:
        config = load_hf_config(path, **overrides)
        sd = load_hf_state_dict(path)
    return LlamaForCausalLM(config), hf_state_dict_to_params(sd, config, dtype=dtype)
