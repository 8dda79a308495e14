"""The one table between our Llama parameter paths and Hugging Face ``LlamaForCausalLM`` names
(Mistral, Qwen2 and Qwen3 name their tensors the same way).

Our tree (:mod:`lora_jax.models.llama`) stacks the decoder layers on a leading [L] axis
and stores kernels (in, out); HF names every layer ``model.layers.{i}`` and stores
``nn.Linear`` weights (out, in). :data:`HF_LLAMA_NAMES` maps each of our '/'-joined
leaf paths to its HF tensor name (``{i}``: the index along the stacked axis; leaves
named ``kernel`` are stored transposed); :data:`LLAMA_MODULE_MAP` is the same table at
module granularity (the LoRA-able leaves), as PEFT names adapters.

Example:
    >>> import numpy as np
    >>> sd = llama_to_hf({"layers/self_attn/q_proj/kernel": np.zeros((2, 5, 7))})
    >>> sorted(sd), sd["model.layers.1.self_attn.q_proj.weight"].shape
    (['model.layers.0.self_attn.q_proj.weight', 'model.layers.1.self_attn.q_proj.weight'], (7, 5))
    >>> llama_from_hf(sd, num_layers=2)["layers/self_attn/q_proj/kernel"].shape
    (2, 5, 7)
    >>> LLAMA_MODULE_MAP["layers/mlp/down_proj/kernel"]
    'model.layers.{i}.mlp.down_proj'
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import numpy as np

__all__ = ["HF_LLAMA_NAMES", "LLAMA_MODULE_MAP", "is_llama_tree", "llama_from_hf",
           "llama_to_hf"]


#: our '/'-joined leaf path -> HF tensor name; "{i}" is the index on the stacked layer axis.
#: Leaves named "kernel" are torch Linear weights, stored transposed (out, in) by HF.
HF_LLAMA_NAMES: dict[str, str] = {
    "embed_tokens/embedding": "model.embed_tokens.weight",
    "norm/scale": "model.norm.weight",
    "lm_head/kernel": "lm_head.weight",
    "layers/input_layernorm/scale": "model.layers.{i}.input_layernorm.weight",
    "layers/post_attention_layernorm/scale": "model.layers.{i}.post_attention_layernorm.weight",
    "layers/self_attn/q_norm/scale": "model.layers.{i}.self_attn.q_norm.weight",   # qwen3
    "layers/self_attn/k_norm/scale": "model.layers.{i}.self_attn.k_norm.weight",
    **{
        f"layers/{block}/{proj}/{leaf}": f"model.layers.{{i}}.{block}.{proj}.{hf_leaf}"
        for block, projs in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                             ("mlp", ("gate_proj", "up_proj", "down_proj")))
        for proj in projs
        for leaf, hf_leaf in (("kernel", "weight"), ("bias", "bias"))
    },
}

#: our LoRA-able leaf path -> HF module name
LLAMA_MODULE_MAP: dict[str, str] = {
    path: name.rsplit(".", 1)[0] for path, name in HF_LLAMA_NAMES.items()
    if path.endswith(("/kernel", "/embedding"))
}


def _transposed(path: str) -> bool:
    return path.endswith("/kernel")


def is_llama_tree(paths: Iterable[str]) -> bool:
    """Whether a tree with these leaf paths is our reference Llama."""
    paths = set(paths)
    return "embed_tokens/embedding" in paths and "layers/self_attn/q_proj/kernel" in paths


def llama_to_hf(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our ``{path: array}`` -> HF ``{name: array}``: layers unstacked, kernels (out, in)."""
    out = {}
    for path, x in flat.items():
        if path not in HF_LLAMA_NAMES:
            raise ValueError(f"no HF Llama name for leaf {path!r} (known: "
                             f"{sorted(HF_LLAMA_NAMES)}).")
        name = HF_LLAMA_NAMES[path]
        layers = [(name.format(i=i), x[i]) for i in range(x.shape[0])] if "{i}" in name \
            else [(name, x)]
        out.update((n, np.asarray(v).T if _transposed(path) else v) for n, v in layers)
    return out


_FROM_HF = [(re.compile(re.escape(name).replace(re.escape("{i}"), r"(\d+)") + "$"), path)
            for path, name in HF_LLAMA_NAMES.items()]


def _lookup(name: str) -> tuple[str, int | None] | None:
    """``(our path, layer index or None)`` of an HF name, with or without the ``model.``
    prefix (some exports omit it)."""
    for candidate in (name, f"model.{name}"):
        for rx, path in _FROM_HF:
            m = rx.match(candidate)
            if m:
                return path, (int(m.group(1)) if m.groups() else None)
    return None


def llama_from_hf(sd: Mapping[str, np.ndarray], num_layers: int) -> dict[str, np.ndarray]:
    """HF ``{name: array}`` -> our ``{path: array}``: layers stacked on axis 0, kernels (in, out).

    Raises ValueError naming unknown tensors, layers beyond ``num_layers`` and layers
    missing a tensor that other layers have. Drop tensors you do not want converted
    (``rotary_emb.inv_freq``, a tied ``lm_head``) before calling."""
    out, per_layer, unknown = {}, {}, []
    for name, x in sd.items():
        hit = _lookup(name)
        if hit is None or (hit[1] is not None and hit[1] >= num_layers):
            unknown.append(name)
            continue
        path, i = hit
        x = np.asarray(x).T if _transposed(path) else np.asarray(x)
        if i is None:
            out[path] = x
        else:
            per_layer.setdefault(path, [None] * num_layers)[i] = x
    if unknown:
        raise ValueError(f"unexpected HF Llama tensors: {sorted(unknown)}")
    for path, xs in per_layer.items():
        absent = [i for i, x in enumerate(xs) if x is None]
        if absent:
            raise ValueError(f"layers {absent} are missing tensor "
                             f"{HF_LLAMA_NAMES[path].replace('{i}', '*')}")
        out[path] = np.stack(xs)
    return out
