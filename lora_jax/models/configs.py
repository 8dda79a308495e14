"""Llama-family hyper-parameters: :class:`LlamaConfig`, its HF ``config.json`` form, and configs
by name.

One decoder covers the Hugging Face ``model_type`` s that differ from Llama only in a detail:
``mistral`` (a sliding attention window), ``qwen2`` (biases on q, k and v, none on o) and
``qwen3`` (an RMSNorm over each head of q and k before RoPE).

Example:
    >>> cfg = llama_config("Llama-2-70B")
    >>> cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim
    (64, 8, 8, 128)
    >>> LlamaConfig.from_hf(cfg.to_hf()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

__all__ = ["LlamaConfig", "LLAMA_CONFIGS", "MODEL_TYPES", "llama_config"]

Dtype = Any

_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

#: HF model_type -> the transformers class a config.json names for it
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _freeze_mapping(d: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if d is None:
        return None
    if isinstance(d, tuple):
        return d
    return tuple(sorted((str(k), v) for k, v in dict(d).items()))


# The fields config.json stores under our names (rope_scaling and the token ids need care).
_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "rope_theta", "tie_word_embeddings", "max_position_embeddings", "attention_bias",
              "mlp_bias")


def _rope_type(rope_scaling: Mapping[str, Any]) -> str:
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (hashable: usable as a static arg).

    ``rope_scaling`` is stored as a sorted tuple of ``(key, value)`` pairs so that the
    config stays hashable; use :attr:`rope_scaling_dict` to read it as a dict.
    ``rope_freq_factors`` (from GGUF ``rope_freqs`` tensors) divides the RoPE
    inverse frequencies, as llama.cpp does, when given.
    ``model_type`` is the HF architecture (a key of :data:`MODEL_TYPES`); with
    ``sliding_window=w`` a query sees only the ``w`` most recent keys, itself included.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    rope_freq_factors: tuple[float, ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    model_type: str = "llama"
    sliding_window: int | None = None

    def __post_init__(self):
        _check_model_type(self.model_type)
        if self.sliding_window is not None:
            if self.model_type == "llama":
                raise ValueError("sliding_window needs model_type 'mistral', 'qwen2' or 'qwen3' "
                                 "(Llama's config.json has no window)")
            if not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
                raise ValueError(f"sliding_window must be a positive int or None, got "
                                 f"{self.sliding_window!r}")
        # A frozen dataclass: derived and unhashable fields are normalised via object.__setattr__.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; pass head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        object.__setattr__(self, "rope_scaling", _freeze_mapping(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.rope_freq_factors is not None:
            ff = tuple(float(f) for f in self.rope_freq_factors)
            if len(ff) != self.head_dim // 2:
                raise ValueError(f"rope_freq_factors must have head_dim/2={self.head_dim // 2} "
                                 f"entries, got {len(ff)}")
            object.__setattr__(self, "rope_freq_factors", ff)
        rt = self.rope_type
        if rt not in _SUPPORTED_ROPE_TYPES:
            raise NotImplementedError(
                f"rope_type {rt!r} is not supported (supported: {_SUPPORTED_ROPE_TYPES})"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def rope_type(self) -> str:
        rs = self.rope_scaling_dict
        return _rope_type(rs) if rs else "default"

    @property
    def qkv_bias(self) -> bool:
        """q, k and v have biases (o too only with ``attention_bias``)."""
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def qk_norm(self) -> bool:
        """q and k pass an RMSNorm over each head's ``head_dim`` before RoPE."""
        return self.model_type == "qwen3"

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
        """Builds a config from an HF ``config.json`` dict (transformers v4 or v5 style)."""
        hf = dict(hf)
        mt = hf.get("model_type", "llama")
        _check_model_type(mt)   # before the other keys: a Gemma config fails here, by name
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r} (the Llama family uses silu)")
        rope_theta, rope_scaling = _hf_rope(hf)
        eos = hf.get("eos_token_id")
        kwargs = dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=int(hf["num_attention_heads"]),
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            model_type=mt,
            sliding_window=_hf_window(hf, mt),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` (transformers-compatible) dict for this config."""
        d = {"architectures": [MODEL_TYPES[self.model_type]], "model_type": self.model_type,
             "hidden_act": "silu", **{f: getattr(self, f) for f in _HF_FIELDS},
             "rope_scaling": self.rope_scaling_dict}
        if self.model_type != "llama":
            d["sliding_window"] = self.sliding_window
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = self.sliding_window is not None
            d["max_window_layers"] = 0 if self.sliding_window else self.num_hidden_layers
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        eos = self.eos_token_id
        if eos is not None:
            d["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
        return d


def _check_model_type(model_type) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r} (supported: "
                         f"{sorted(MODEL_TYPES)}, the Llama family)")


def _hf_window(hf: Mapping[str, Any], model_type: str) -> int | None:
    """The one sliding window every layer uses, or None; a mix of windowed and full layers
    (Qwen's ``max_window_layers``, ``layer_types``) is refused."""
    window = hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return None
    if model_type == "mistral":
        return int(window)
    layers = int(hf["num_hidden_layers"])
    kinds = hf.get("layer_types")
    if kinds is None:
        # transformers' default max_window_layers is 28 for both Qwen generations
        first = int(hf.get("max_window_layers", 28)) if hf.get("use_sliding_window") else layers
        kinds = ["full_attention"] * min(first, layers) + \
            ["sliding_attention"] * max(layers - first, 0)
    kinds = set(kinds)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return int(window)
    raise ValueError(f"{model_type} config mixes sliding-window and full-attention layers "
                     f"({sorted(kinds)}, use_sliding_window / max_window_layers); only one "
                     "kind of attention for every layer is supported")


def _hf_rope(hf: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` of a config.json; "default" scaling reads as None."""
    # transformers v5 stores RoPE settings under rope_parameters (incl. rope_theta).
    rope_params = hf.get("rope_parameters")
    rope_scaling = hf.get("rope_scaling")
    rope_theta = hf.get("rope_theta")
    if isinstance(rope_params, Mapping):
        if isinstance(rope_params.get("full_attention"), Mapping):
            rope_params = rope_params["full_attention"]
        rope_params = dict(rope_params)
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta")
        rs = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        if _rope_type(rs) != "default" and rope_scaling is None:
            rope_scaling = rs
    if rope_scaling is not None:
        rope_scaling = {k: v for k, v in dict(rope_scaling).items() if k != "rope_theta"}
        if _rope_type(rope_scaling) == "default":
            rope_scaling = None
    return float(10000.0 if rope_theta is None else rope_theta), rope_scaling


# Published HF config.json values (vocab, hidden, intermediate, layers, heads, kv heads).
LLAMA_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-2-7B": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
    "Llama-2-13B": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40),
    "Llama-2-70B": dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8),
    "Llama-3-8B": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       rope_theta=500000.0),
    "Llama-3-70B": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        rope_theta=500000.0),
}


def llama_config(name: str, **overrides) -> LlamaConfig:
    """The :class:`LlamaConfig` of a published model in :data:`LLAMA_CONFIGS`, with overrides."""
    if name not in LLAMA_CONFIGS:
        raise ValueError(f"unknown Llama config {name!r}; known: {sorted(LLAMA_CONFIGS)} "
                         "(or build a LlamaConfig directly)")
    return LlamaConfig(**{**LLAMA_CONFIGS[name], **overrides})
