"""A trained adapter as a llama.cpp GGUF LoRA adapter (``llama-cli --lora``, ``llama-server``).

llama.cpp's ``convert_lora_to_gguf.py`` writes, for every adapted base tensor ``T``
(``blk.0.attn_q.weight``, ``output.weight``, ...), the tensors ``T.lora_a`` (numpy shape
``[r, in]``, PEFT's ``lora_A``) and ``T.lora_b`` (``[out, r]``, PEFT's ``lora_B``), with
``general.type = "adapter"``, ``adapter.type = "lora"`` and one float ``adapter.lora.alpha``;
llama.cpp adds ``alpha / r * lora_b @ lora_a`` to ``T`` (r read off each tensor). The
converter runs each B through the base converter's tensor code, so the rows of
``attn_q``/``attn_k`` B get the same RoPE interleaving as the base (``LlamaModel.permute``);
``token_embd.weight.lora_a`` is stored ``[vocab, r]`` (rows gathered by token id).

Example:
    >>> import pathlib, tempfile, jax.numpy as jnp
    >>> from lora_jax.lora import lorafy
    >>> p = lorafy({"layers": {"mlp": {"up_proj": {"kernel": jnp.ones((2, 5, 7))}}}}, rank=3,
    ...            targets="up_proj", layout={"up_proj": (1, (0,))})
    >>> out = to_gguf_lora(p, pathlib.Path(tempfile.mkdtemp()) / "a.gguf")
    >>> import gguf; r = gguf.GGUFReader(str(out))
    >>> sorted(t.name for t in r.tensors)[:2], r.tensors[0].data.shape
    (['blk.0.ffn_up.weight.lora_a', 'blk.0.ffn_up.weight.lora_b'], (3, 5))
    >>> import shutil; shutil.rmtree(out.parent)
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import gguf
import jax
import numpy as np

from lora_jax.checkpoint import atomic_file
from lora_jax.core import path_str
from lora_jax.interop.peft_format import has_tied_embeddings, strip_params
from lora_jax.lora import LoraWeight

__all__ = ["GGUF_LLAMA_NAMES", "permute_rope", "to_gguf_lora"]

#: our '/'-joined Llama leaf path -> llama.cpp tensor name ("{i}": the stacked layer index)
GGUF_LLAMA_NAMES: dict[str, str] = {
    "embed_tokens/embedding": "token_embd.weight",
    "lm_head/kernel": "output.weight",
    **{f"layers/{block}/{proj}/kernel": f"blk.{{i}}.{name}.weight" for block, proj, name in (
        ("self_attn", "q_proj", "attn_q"), ("self_attn", "k_proj", "attn_k"),
        ("self_attn", "v_proj", "attn_v"), ("self_attn", "o_proj", "attn_output"),
        ("mlp", "gate_proj", "ffn_gate"), ("mlp", "up_proj", "ffn_up"),
        ("mlp", "down_proj", "ffn_down"))},
}
_DTYPES = {"f32": np.float32, "f16": np.float16}


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` of q/k rows (HF rotate-half -> interleaved pairs);
    :func:`lora_jax.models.gguf.unpermute_rope` inverts it."""
    if w.shape[0] % (2 * n_head):
        raise ValueError(f"{w.shape[0]} rows cannot be split into {n_head} heads of RoPE pairs; "
                         "check the head counts (config= or base_gguf=).")
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _heads(config, base) -> dict[str, int] | None:
    if config is not None:
        if getattr(config, "model_type", "llama") != "llama":
            raise ValueError(f"to_gguf_lora: config is a {config.model_type!r} model; only "
                             "llama models are supported (llama.cpp names and permutes the "
                             "tensors of other architectures differently).")
        return {"attn_q": int(config.num_attention_heads),
                "attn_k": int(config.num_key_value_heads)}
    if base is None:
        return None
    n = {k: base.get(f"llama.attention.{key}") for k, key in
         (("attn_q", "head_count"), ("attn_k", "head_count_kv"))}
    if n["attn_q"] is None:
        raise ValueError("to_gguf_lora: base_gguf has no llama.attention.head_count; pass "
                         "config= (a LlamaConfig) for the q/k row permutation.")
    return {"attn_q": int(n["attn_q"]), "attn_k": int(n["attn_k"] or n["attn_q"])}


def _read_base(base_gguf) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(metadata numbers/strings, {tensor name: numpy shape}) of the base GGUF."""
    try:
        reader = gguf.GGUFReader(os.fspath(base_gguf))
        meta = {}
        for k, f in reader.fields.items():
            if k.startswith(("general.architecture", "llama.attention.head_count")):
                meta[k] = f.contents()
        shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist()))
                  for t in reader.tensors}
    except (OSError, ValueError, IndexError, KeyError) as e:
        raise ValueError(f"to_gguf_lora: base_gguf {os.fspath(base_gguf)!r} is not a readable "
                         f"GGUF file ({type(e).__name__}: {str(e)[:200]}).") from None
    if meta.get("general.architecture", "llama") != "llama":
        raise ValueError(f"to_gguf_lora: base_gguf is a {meta['general.architecture']!r} model; "
                         "only llama bases are supported.")
    return meta, shapes


def _leaves(params, names) -> list[tuple[str, str, LoraWeight]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, LoraWeight))
    out = []
    for kp, x in flat:
        if not isinstance(x, LoraWeight):
            continue
        path = strip_params(path_str(kp))
        if path not in names:
            raise ValueError(f"to_gguf_lora: leaf {path!r} has no llama.cpp tensor name; pass "
                             f"names= (known: {sorted(names)}).")
        if x.a is None or x.b is None or x.in_ndim != 1 or x.stack_ndim != (
                "{i}" in names[path]):
            raise ValueError(f"to_gguf_lora: leaf {path!r} is not a (stacked) 2-D LoRA weight "
                             f"with factors (shape {x.shape}, {x.stack_ndim} stacked axes).")
        out.append((path, names[path], x))
    if not out:
        raise ValueError("to_gguf_lora: params contain no LoraWeight (lorafy them first).")
    if has_tied_embeddings(params) and any(p == "embed_tokens/embedding" for p, _, _ in out):
        raise ValueError("to_gguf_lora: LoRA on embed_tokens of a model with tied embeddings "
                         "also changes the output head here, which llama.cpp's adapter does "
                         "not; exclude embed_tokens from the LoRA targets.")
    return out


def _common_alpha(leaves, alpha) -> float:
    if alpha is not None:
        return float(alpha)
    plain = Counter(x.alpha for _, _, x in leaves if not x.rslora)
    return float(plain.most_common(1)[0][0]) if plain else float(leaves[0][2].rank)


def _tensors(leaves, alpha: float, heads, dtype) -> dict[str, np.ndarray]:
    """``{name.lora_a: [r, in], name.lora_b: [out, r]}``, per-leaf scale folded into B."""
    out = {}
    for path, template, x in leaves:
        a, b = (np.asarray(jax.device_get(v), np.float32) for v in (x.a, x.b))
        if x.stack_ndim == 0:
            a, b = a[None], b[None]
        fold = x.scale / (alpha / x.rank)       # llama.cpp applies alpha / r to every tensor
        for i in range(a.shape[0]):
            name = template.format(i=i)
            la, lb = a[i].T, (b[i] * np.float32(fold)).T            # [r, in], [out, r]
            if path == "embed_tokens/embedding":
                la = a[i]                                           # [vocab, r]: gathered rows
            kind = name.split(".")[2] if name.startswith("blk.") else None
            if kind in ("attn_q", "attn_k"):
                if heads is None:
                    raise ValueError("to_gguf_lora: q/k adapters need the head counts for "
                                     "llama.cpp's RoPE row order; pass config= or base_gguf=.")
                lb = permute_rope(lb, heads[kind])
            out[f"{name}.lora_a"] = np.ascontiguousarray(la, dtype)
            out[f"{name}.lora_b"] = np.ascontiguousarray(lb, dtype)
    return out


def to_gguf_lora(params, path, *, base_gguf=None, config=None, alpha: float | None = None,
                 dtype: str = "f32", names: dict[str, str] | None = None,
                 overwrite: bool = False) -> Path:
    """Write the LoRA nodes of our Llama ``params`` as a llama.cpp GGUF LoRA adapter file.

    ``base_gguf``: the base model's ``.gguf`` (what llama.cpp will load under the adapter);
    every adapted tensor must exist there with the adapter's shape, and its metadata gives
    the head counts for the q/k row permutation. Without it pass ``config`` (anything with
    ``num_attention_heads`` / ``num_key_value_heads``, e.g. our ``LlamaConfig``) when q or
    k is adapted. ``alpha``: the file's one ``adapter.lora.alpha`` (default: the nodes'
    most common alpha, else the first node's rank); each node's own scale (alpha/r, rsLoRA,
    any alpha_pattern) is folded into its B, so llama.cpp's ``alpha / r`` reproduces it.
    ``dtype``: ``"f32"`` or ``"f16"``. ``names``: our leaf path -> GGUF tensor name (default
    :data:`GGUF_LLAMA_NAMES`). Written to a temporary file and renamed; an existing file is
    refused unless ``overwrite=True``. Returns the path.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"to_gguf_lora: dtype {dtype!r} is not supported; use 'f32' or 'f16'.")
    path = Path(os.fspath(path))
    if path.exists() and not overwrite:
        raise FileExistsError(f"to_gguf_lora: {path} exists; nothing was written. Pass "
                              "overwrite=True to replace it, or a new path.")
    leaves = _leaves(params, GGUF_LLAMA_NAMES if names is None else names)
    meta, shapes = _read_base(base_gguf) if base_gguf is not None else ({}, None)
    alpha = _common_alpha(leaves, alpha)
    tensors = _tensors(leaves, alpha, _heads(config, meta if base_gguf else None),
                       _DTYPES[dtype])
    if shapes is not None:
        _check_against_base(tensors, shapes)

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for name, t in tensors.items():
            w.add_tensor(name, t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return atomic_file(path, write)


def _check_against_base(tensors: dict[str, np.ndarray], shapes) -> None:
    for name in sorted(n for n in tensors if n.endswith(".lora_a")):
        base = name.removesuffix(".lora_a")
        la, lb = tensors[name], tensors[f"{base}.lora_b"]
        want = (lb.shape[0], la.shape[1]) if base != "token_embd.weight" else \
            (la.shape[0], lb.shape[0])
        if base not in shapes:
            raise ValueError(f"to_gguf_lora: the base GGUF has no tensor {base!r}; the adapter "
                             "targets a weight that model lacks (wrong base_gguf?).")
        if tuple(shapes[base]) != want:
            raise ValueError(f"to_gguf_lora: tensor {base!r} is {shapes[base]} in the base GGUF "
                             f"but the adapter makes {want} (wrong base_gguf?).")
