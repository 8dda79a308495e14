"""GGUF files (llama.cpp): the Llama config from metadata, tensors dequantized and renamed to HF.

Reading uses the ``gguf`` package (any quantization it can dequantize; tensors come out as
float32). llama.cpp's converter interleaves the RoPE pairs of the q/k rows
(``LlamaModel.permute``); :func:`unpermute_rope` maps them back to HF's rotate-half
layout, so a GGUF state dict goes through the same HF -> ours conversion as a safetensors
checkpoint (:func:`lora_jax.models.hf.hf_state_dict_to_params`).

Example:
    >>> import numpy as np
    >>> w = np.arange(8).reshape(8, 1)     # one head of 8 rows, pairs interleaved
    >>> unpermute_rope(w, 1).ravel().tolist()
    [0, 2, 4, 6, 1, 3, 5, 7]
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from lora_jax.models.configs import LlamaConfig
from lora_jax.models.gguf_check import check_gguf

__all__ = [
    "is_gguf",
    "open_gguf",
    "gguf_field",
    "gguf_config",
    "gguf_to_hf_state_dict",
    "unpermute_rope",
]

PathLike = str | os.PathLike

_GGUF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}
_GGUF_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def is_gguf(path: PathLike) -> bool:
    """A ``.gguf`` suffix, or a file starting with the GGUF magic bytes."""
    path = Path(path)
    if path.suffix == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def open_gguf(path: PathLike) -> GGUFReader:
    """A ``GGUFReader`` of a file checked first (:func:`check_gguf`); any reader error
    is a ``ValueError`` naming the file."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a GGUF file.")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty, not a GGUF file.")
    check_gguf(path)
    try:
        return GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the gguf package's error, with the file's name
        raise ValueError(f"{path} is not a readable GGUF file: {type(e).__name__}: "
                         f"{str(e)[:300]}") from None


def _where(reader: GGUFReader) -> str:
    return str(getattr(reader.data, "filename", None) or "the GGUF file")


def gguf_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata value (``default`` when the key is absent)."""
    f = reader.get_field(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # noqa: BLE001 - a malformed value, with the file and key
        raise ValueError(f"{_where(reader)}: metadata key {key!r} cannot be read "
                         f"({type(e).__name__}: {e}).") from None


def _tensor(reader: GGUFReader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise KeyError(f"GGUF file has no tensor {name!r}")


def _vocab_size(reader: GGUFReader, arch: str) -> int:
    vocab = gguf_field(reader, f"{arch}.vocab_size")
    if vocab is not None:
        return int(vocab)
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)
    return int(_tensor(reader, "token_embd.weight").shape[-1])


def _rope(reader: GGUFReader, arch: str, names: set[str]) -> dict[str, Any]:
    rope_scaling = None
    stype = gguf_field(reader, f"{arch}.rope.scaling.type")
    if stype not in (None, "none"):
        if stype != "linear":
            raise NotImplementedError(f"GGUF rope scaling type {stype!r} is not supported")
        rope_scaling = {"rope_type": "linear",
                        "factor": float(gguf_field(reader, f"{arch}.rope.scaling.factor"))}
    factors = None
    if "rope_freqs.weight" in names:
        factors = tuple(float(x) for x in _dequant(_tensor(reader, "rope_freqs.weight")))
    return dict(rope_theta=float(gguf_field(reader, f"{arch}.rope.freq_base", 10000.0)),
                rope_scaling=rope_scaling, rope_freq_factors=factors)


def gguf_config(reader: GGUFReader, **overrides) -> LlamaConfig:
    """The :class:`LlamaConfig` in a GGUF file's metadata (``llama`` architecture only)."""
    arch = gguf_field(reader, "general.architecture", "llama")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (expected 'llama')")

    def g(k, default=None, required=False):
        v = gguf_field(reader, f"{arch}.{k}", default)
        numeric = isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
        if (v is None and required) or (v is not None and not numeric):
            raise ValueError(f"{_where(reader)}: metadata key {arch}.{k} is "
                             f"{'missing' if v is None else repr(v)[:80]}; it must be a number.")
        return v

    n_head = int(g("attention.head_count", required=True))
    hidden = int(g("embedding_length", required=True))
    head_dim = g("attention.key_length")
    if head_dim is None:
        head_dim = g("rope.dimension_count")
    names = {t.name for t in reader.tensors}
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    kwargs = dict(
        vocab_size=_vocab_size(reader, arch),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length", required=True)),
        num_hidden_layers=int(g("block_count", required=True)),
        num_attention_heads=n_head,
        num_key_value_heads=int(g("attention.head_count_kv", n_head)),
        head_dim=int(head_dim) if head_dim is not None else hidden // n_head,
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(g("context_length", 2048)),
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_gate.bias" in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
        **_rope(reader, arch, names),
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _dequant(t) -> np.ndarray:
    """A GGUF tensor as float32, numpy shape = reversed GGUF dims."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type == GGMLQuantizationType.F32:
        arr = np.asarray(t.data, np.float32)
    elif t.tensor_type == GGMLQuantizationType.BF16:
        arr = np.asarray(t.data).view(ml_dtypes.bfloat16).astype(np.float32)
    else:
        arr = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    return arr.reshape(shape)


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp ``LlamaModel.permute`` (convert_hf_to_gguf.py).

    llama.cpp: ``w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)``
    (interleaved RoPE pairs); this maps the GGUF rows back to HF's rotate-half layout.
    """
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_to_hf_state_dict(reader: GGUFReader, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Dequantized GGUF tensors renamed to HF names, q/k un-permuted (float32 numpy)."""
    sd: dict[str, np.ndarray] = {}
    unknown = []
    heads = {"attn_q.": config.num_attention_heads, "attn_k.": config.num_key_value_heads}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into config.rope_freq_factors
        m = _BLK_RE.match(t.name)
        if m:
            i, suffix = int(m.group(1)), m.group(2)
            if suffix not in _GGUF_LAYER:
                unknown.append(t.name)
                continue
            w = _dequant(t)
            n_head = heads.get(suffix[: suffix.index(".") + 1])
            sd[f"model.layers.{i}.{_GGUF_LAYER[suffix]}"] = (
                w if n_head is None else unpermute_rope(w, n_head))
        elif t.name in _GGUF_GLOBAL:
            sd[_GGUF_GLOBAL[t.name]] = _dequant(t)
        else:
            unknown.append(t.name)
    if unknown:
        raise ValueError(f"unexpected tensors in GGUF file: {sorted(unknown)}")
    return sd
