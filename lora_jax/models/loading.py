"""Loading Llama checkpoints (HF safetensors directories and GGUF files) and tokenizers.

* :func:`from_pretrained` -> ``(LlamaForCausalLM, params)``.
* :func:`load_tokenizer` -> :class:`Tokenizer` (from ``tokenizer.json`` or GGUF metadata),
  with a small ChatML chat-template formatter (:meth:`Tokenizer.apply_chat_template`).

torch ``nn.Linear`` weights are stored (out, in); they are transposed to the (in, out)
layout of ``nn.Dense`` kernels once, at load time, and per-layer tensors are stacked
on a leading layer axis to match the ``nn.scan``-ed parameter tree.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM

__all__ = [
    "from_pretrained",
    "load_config",
    "load_hf_state_dict",
    "hf_state_dict_to_params",
    "gguf_to_hf_state_dict",
    "load_tokenizer",
    "Tokenizer",
    "format_chatml",
]

PathLike = str | os.PathLike

# ---------------------------------------------------------------------------------------
# safetensors (a tiny reader: numpy + ml_dtypes, handles bf16 without a framework)
# ---------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _st_dtype(name: str):
    if name in _ST_DTYPES:
        return np.dtype(_ST_DTYPES[name])
    import ml_dtypes

    table = {
        "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2,
    }
    if name not in table:
        raise ValueError(f"unsupported safetensors dtype {name!r}")
    return np.dtype(table[name])


def read_safetensors(path: PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.safetensors`` file into numpy arrays (memory-mapped, read-only)."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dt = _st_dtype(info["dtype"])
        arr = np.frombuffer(mm[base + start : base + end], dtype=dt).reshape(info["shape"])
        out[name] = arr
    return out


def load_hf_state_dict(path: PathLike) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint dir (``model.safetensors`` or a sharded index)."""
    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        sd: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(read_safetensors(path / shard))
        missing = sorted(set(weight_map) - set(sd))
        if missing:
            raise ValueError(f"tensors listed in {index.name} but absent from shards: {missing}")
        return sd
    others = sorted(path.glob("*.safetensors"))
    if others:
        sd = {}
        for f in others:
            sd.update(read_safetensors(f))
        return sd
    raise FileNotFoundError(
        f"no model.safetensors / model.safetensors.index.json in {path} "
        "(only safetensors checkpoints are supported)"
    )


def load_config(path: PathLike, **overrides) -> LlamaConfig:
    """The :class:`LlamaConfig` of an HF checkpoint dir or a GGUF file."""
    path = Path(path)
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        return _gguf_config(GGUFReader(str(path)), **overrides)
    return LlamaConfig.from_hf(json.loads((path / "config.json").read_text()), **overrides)


# ---------------------------------------------------------------------------------------
# HF state dict -> our param tree
# ---------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")

# HF per-layer suffix -> (path in our tree under "layers", is_linear_weight)
_LAYER_MAP = {
    "input_layernorm.weight": (("input_layernorm", "scale"), False),
    "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), False),
}
for _p in ("q_proj", "k_proj", "v_proj", "o_proj"):
    _LAYER_MAP[f"self_attn.{_p}.weight"] = (("self_attn", _p, "kernel"), True)
    _LAYER_MAP[f"self_attn.{_p}.bias"] = (("self_attn", _p, "bias"), False)
for _p in ("gate_proj", "up_proj", "down_proj"):
    _LAYER_MAP[f"mlp.{_p}.weight"] = (("mlp", _p, "kernel"), True)
    _LAYER_MAP[f"mlp.{_p}.bias"] = (("mlp", _p, "bias"), False)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _set(tree: dict, path: Sequence[str], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _expected_shapes(config: LlamaConfig) -> dict:
    model = LlamaForCausalLM(config)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    )
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def hf_state_dict_to_params(
    sd: Mapping[str, np.ndarray], config: LlamaConfig, *, dtype=jnp.float32
) -> dict:
    """Converts HF ``LlamaForCausalLM`` tensors to our (stacked, (in, out)) param tree.

    Unknown tensors, missing tensors and shape mismatches raise ``ValueError``.
    """
    L = config.num_hidden_layers
    per_layer: dict[tuple[str, ...], list] = {}
    params: dict = {}
    unknown = []
    for name, arr in sd.items():
        key = name
        if key.startswith("model."):
            key = key[len("model.") :]
        if key.endswith(_IGNORED_SUFFIXES):
            continue
        m = _LAYER_RE.match(key)
        if m:
            i, suffix = int(m.group(1)), m.group(2)
            if suffix not in _LAYER_MAP or i >= L:
                unknown.append(name)
                continue
            path, is_linear = _LAYER_MAP[suffix]
            a = np.asarray(arr)
            if is_linear:
                a = a.T  # torch (out, in) -> (in, out)
            per_layer.setdefault(path, [None] * L)[i] = a
        elif key == "embed_tokens.weight":
            _set(params, ("embed_tokens", "embedding"), np.asarray(arr))
        elif key == "norm.weight":
            _set(params, ("norm", "scale"), np.asarray(arr))
        elif name == "lm_head.weight" or key == "lm_head.weight":
            if not config.tie_word_embeddings:
                _set(params, ("lm_head", "kernel"), np.asarray(arr).T)
        else:
            unknown.append(name)
    if unknown:
        raise ValueError(f"unexpected tensors in checkpoint: {sorted(unknown)}")
    for path, arrs in per_layer.items():
        missing_layers = [i for i, a in enumerate(arrs) if a is None]
        if missing_layers:
            raise ValueError(f"layers {missing_layers} are missing tensor {'.'.join(path)}")
        _set(params, ("layers",) + path, np.stack(arrs, axis=0))

    expected = _expected_shapes(config)
    exp_flat = {
        tuple(k.key for k in p): s
        for p, s in jax.tree_util.tree_flatten_with_path(expected, is_leaf=lambda x: isinstance(x, tuple))[0]
    }
    got_flat = {
        tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    missing = sorted(".".join(k) for k in set(exp_flat) - set(got_flat))
    extra = sorted(".".join(k) for k in set(got_flat) - set(exp_flat))
    if missing or extra:
        raise ValueError(f"checkpoint does not match config: missing={missing} unexpected={extra}")
    bad = {
        ".".join(k): (tuple(got_flat[k].shape), exp_flat[k])
        for k in exp_flat
        if tuple(got_flat[k].shape) != exp_flat[k]
    }
    if bad:
        raise ValueError(f"shape mismatch (got, expected): {bad}")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float32), dtype), params)


# ---------------------------------------------------------------------------------------
# GGUF
# ---------------------------------------------------------------------------------------


def _gguf_field(reader, key: str, default: Any = None) -> Any:
    f = reader.get_field(key)
    return default if f is None else f.contents()


def _gguf_config(reader, **overrides) -> LlamaConfig:
    arch = _gguf_field(reader, "general.architecture", "llama")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r} (expected 'llama')")

    def g(k, default=None):
        return _gguf_field(reader, f"{arch}.{k}", default)

    n_head = int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_head))
    hidden = int(g("embedding_length"))
    head_dim = g("attention.key_length")
    if head_dim is None:
        head_dim = g("rope.dimension_count")
    head_dim = int(head_dim) if head_dim is not None else hidden // n_head
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = g("vocab_size")
    if vocab is None:
        if tokens is not None:
            vocab = len(tokens)
        else:
            emb = _gguf_tensor_by_name(reader, "token_embd.weight")
            vocab = int(emb.shape[-1])
    names = {t.name for t in reader.tensors}
    rope_scaling = None
    stype = g("rope.scaling.type")
    if stype not in (None, "none"):
        if stype == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
        else:
            raise NotImplementedError(f"GGUF rope scaling type {stype!r} is not supported")
    rope_freq_factors = None
    if "rope_freqs.weight" in names:
        rope_freq_factors = tuple(
            float(x) for x in _gguf_dequant(_gguf_tensor_by_name(reader, "rope_freqs.weight"))
        )
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
    kwargs = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")),
        num_hidden_layers=int(g("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(g("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        rope_freq_factors=rope_freq_factors,
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(g("context_length", 2048)),
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_gate.bias" in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _gguf_tensor_by_name(reader, name: str):
    for t in reader.tensors:
        if t.name == name:
            return t
    raise KeyError(name)


def _gguf_dequant(t) -> np.ndarray:
    """Dequantizes a GGUF tensor to float32 with numpy shape = reversed GGUF dims."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    if t.tensor_type == GGMLQuantizationType.F32:
        arr = np.asarray(t.data, np.float32)
    elif t.tensor_type == GGMLQuantizationType.BF16:
        import ml_dtypes

        arr = np.asarray(t.data).view(ml_dtypes.bfloat16).astype(np.float32)
    else:
        arr = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
    return arr.reshape(shape)


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp ``LlamaModel.permute`` (convert_hf_to_gguf.py).

    llama.cpp: ``w.reshape(n_head, 2, d // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)``
    (interleaved RoPE pairs); this maps the GGUF rows back to HF's rotate-half layout.
    """
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (HF -> GGUF); used to write GGUF files in tests."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


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


def gguf_to_hf_state_dict(reader, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Dequantized GGUF tensors renamed to HF names, q/k un-permuted (float32 numpy)."""
    sd: dict[str, np.ndarray] = {}
    unknown = []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into config.rope_freq_factors
        m = _BLK_RE.match(t.name)
        if m:
            i, suffix = int(m.group(1)), m.group(2)
            if suffix not in _GGUF_LAYER:
                unknown.append(t.name)
                continue
            hf = f"model.layers.{i}.{_GGUF_LAYER[suffix]}"
            w = _gguf_dequant(t)
            if suffix.startswith("attn_q."):
                w = _unpermute_rope(w, config.num_attention_heads)
            elif suffix.startswith("attn_k."):
                w = _unpermute_rope(w, config.num_key_value_heads)
            sd[hf] = w
        elif t.name in _GGUF_GLOBAL:
            sd[_GGUF_GLOBAL[t.name]] = _gguf_dequant(t)
        else:
            unknown.append(t.name)
    if unknown:
        raise ValueError(f"unexpected tensors in GGUF file: {sorted(unknown)}")
    return sd


# ---------------------------------------------------------------------------------------
# Public loader
# ---------------------------------------------------------------------------------------


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


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
    if path.suffix == ".gguf" or (path.is_file() and _is_gguf(path)):
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        config = _gguf_config(reader, **overrides)
        sd = gguf_to_hf_state_dict(reader, config)
    else:
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json (and is not a .gguf file)")
        config = load_config(path, **overrides)
        sd = load_hf_state_dict(path)
    params = hf_state_dict_to_params(sd, config, dtype=dtype)
    return LlamaForCausalLM(config), params


# ---------------------------------------------------------------------------------------
# Tokenizer + chat template
# ---------------------------------------------------------------------------------------

_CHATML_SYSTEM_RE = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)

# Pre-tokenizer regexes for llama.cpp's ``tokenizer.ggml.pre`` values.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def format_chatml(
    messages: Iterable[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    default_system: str | None = None,
) -> str:
    """ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.

    ``default_system`` is prepended as a system message when the first message is
    not a system message (SmolLM2's template does this).
    """
    messages = list(messages)
    parts = []
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` plus special ids and chat template."""

    def __init__(
        self,
        backend,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.chat_template = chat_template
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return list(ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def default_system_prompt(self) -> str | None:
        """The system prompt a ChatML template inserts when none is given (if any)."""
        t = self.chat_template
        if not t or "messages[0]['role'] != 'system'" not in t:
            return None
        m = _CHATML_SYSTEM_RE.search(t)
        return m.group(1) if m else None

    def apply_chat_template(
        self,
        messages: Iterable[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ):
        """Formats ``messages`` with ChatML (the SmolLM2 template); optionally tokenizes."""
        if self.chat_template and "<|im_start|>" not in self.chat_template:
            raise NotImplementedError("only ChatML chat templates are supported")
        text = format_chatml(
            messages,
            add_generation_prompt=add_generation_prompt,
            default_system=self.default_system_prompt,
        )
        return self.encode(text) if tokenize else text


def _gguf_tokenizer(reader) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    model = _gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(
            f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')"
        )
    tokens = _gguf_field(reader, "tokenizer.ggml.tokens")
    merges = _gguf_field(reader, "tokenizer.ggml.merges") or []
    types = _gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = _gguf_field(reader, "tokenizer.ggml.pre", "default")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges])
    tk = HFTokenizer(bpe)
    if pre in ("smollm",):
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_RE), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # "default" / "gpt-2" and friends
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    # CONTROL (3) -> special tokens matched atomically; USER_DEFINED (4) -> added tokens.
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return Tokenizer(
        tk,
        bos_id=None if bos is None else int(bos),
        eos_id=None if eos is None else int(eos),
        chat_template=_gguf_field(reader, "tokenizer.chat_template"),
        add_bos=bool(_gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Tokenizer from a checkpoint dir (``tokenizer.json``) or a ``.gguf`` file's metadata."""
    path = Path(path)
    if path.suffix == ".gguf":
        from gguf import GGUFReader

        return _gguf_tokenizer(GGUFReader(str(path)))
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
    cfg_path = path / "tokenizer_config.json"
    tcfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}

    def tok_id(v):
        if isinstance(v, dict):
            v = v.get("content")
        return None if v is None else backend.token_to_id(v)

    bos_id, eos_id = tok_id(tcfg.get("bos_token")), tok_id(tcfg.get("eos_token"))
    mcfg_path = path / "config.json"
    if mcfg_path.exists():
        mcfg = json.loads(mcfg_path.read_text())
        bos_id = bos_id if bos_id is not None else mcfg.get("bos_token_id")
        if eos_id is None:
            e = mcfg.get("eos_token_id")
            eos_id = e[0] if isinstance(e, list) else e
    template = tcfg.get("chat_template")
    tpath = path / "chat_template.jinja"
    if template is None and tpath.exists():
        template = tpath.read_text()
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        chat_template=template if isinstance(template, str) else None,
        add_bos=bool(tcfg.get("add_bos_token", False)),
    )
