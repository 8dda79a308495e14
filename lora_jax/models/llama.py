"""Reference Llama-family decoder in Flax linen.

The parameter tree naming is a contract relied upon by the HF / PEFT mappings::

    {"embed_tokens": {"embedding": [V, D]},
     "layers": {  # nn.scan over layers; every leaf has a leading [L] axis
        "input_layernorm": {"scale": [L, D]},
        "self_attn": {"q_proj": {"kernel": [L, D, H*hd]}, "k_proj": {"kernel": [L, D, KV*hd]},
                      "v_proj": {"kernel": [L, D, KV*hd]}, "o_proj": {"kernel": [L, H*hd, D]}},
        "post_attention_layernorm": {"scale": [L, D]},
        "mlp": {"gate_proj": {"kernel": [L, D, F]}, "up_proj": {"kernel": [L, D, F]},
                "down_proj": {"kernel": [L, F, D]}}},
     "norm": {"scale": [D]},
     "lm_head": {"kernel": [D, V]}}   # absent when tie_word_embeddings

Kernels are stored in (in, out) layout and are only ever consumed by
``nn.Dense`` (``dot_general``), ``nn.Embed`` (``jnp.take`` -> ``gather``) and
``nn.Embed.attend`` (``transpose`` + ``dot_general``), so that a LoRA
transform intercepting those primitives sees every use of every kernel.

Usage::

    model = LlamaForCausalLM(config)
    logits = model.apply({"params": params}, input_ids)                 # [B, T, V] float32
    cache = init_cache(config, batch_size=B, max_length=S)
    logits, cache = model.apply({"params": params}, ids, cache=cache)   # decoding path
    tokens = generate(model, params, prompt_ids, max_new_tokens=20)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "RMSNorm",
    "init_cache",
    "rope_inv_freq",
    "generate",
    "from_pretrained",
]

Array = jax.Array
Dtype = Any

_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# --------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------


def _freeze_mapping(d: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    if d is None:
        return None
    if isinstance(d, tuple):
        return d
    return tuple(sorted((str(k), v) for k, v in dict(d).items()))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder (hashable: usable as a static arg).

    ``rope_scaling`` is stored as a sorted tuple of ``(key, value)`` pairs so that the
    config stays hashable; use :attr:`rope_scaling_dict` to read it as a dict.
    ``rope_freq_factors`` (from GGUF ``rope_freqs`` tensors) divides the RoPE
    inverse frequencies, as llama.cpp does, when given.
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

    def __post_init__(self):
        # Normalise derived / unhashable fields (frozen dataclass: use object.__setattr__).
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
                raise ValueError(f"rope_freq_factors must have head_dim/2={self.head_dim // 2} entries")
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
        if not rs:
            return "default"
        return str(rs.get("rope_type", rs.get("type", "default")))

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
        """Builds a config from an HF ``config.json`` dict (transformers v4 or v5 style)."""
        hf = dict(hf)
        mt = hf.get("model_type", "llama")
        if mt != "llama":
            raise ValueError(f"unsupported model_type {mt!r} (expected a Llama config)")
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported hidden_act {act!r} (Llama uses silu)")
        # transformers v5 stores RoPE settings under rope_parameters (incl. rope_theta).
        rope_params = hf.get("rope_parameters")
        rope_scaling = hf.get("rope_scaling")
        rope_theta = hf.get("rope_theta")
        if isinstance(rope_params, Mapping):
            if "full_attention" in rope_params and isinstance(rope_params["full_attention"], Mapping):
                rope_params = rope_params["full_attention"]
            rope_params = dict(rope_params)
            if rope_theta is None:
                rope_theta = rope_params.get("rope_theta")
            rs = {k: v for k, v in rope_params.items() if k != "rope_theta"}
            if rs.get("rope_type", rs.get("type", "default")) != "default" and rope_scaling is None:
                rope_scaling = rs
        if rope_scaling is not None:
            rope_scaling = {k: v for k, v in dict(rope_scaling).items() if k != "rope_theta"}
            if rope_scaling.get("rope_type", rope_scaling.get("type", "default")) == "default":
                rope_scaling = None
        if rope_theta is None:
            rope_theta = 10000.0
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
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` (transformers-compatible) dict for this config."""
        d = dict(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling_dict,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            attention_bias=self.attention_bias,
            mlp_bias=self.mlp_bias,
        )
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            d["eos_token_id"] = (
                list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
            )
        return d


# --------------------------------------------------------------------------------------
# RoPE
# --------------------------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies [head_dim // 2] (float32), incl. rope scaling.

    Matches ``transformers.modeling_rope_utils`` ("default", "linear", "llama3").
    """
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(config.rope_theta) ** exponents)).astype(np.float32)
    rs = config.rope_scaling_dict or {}
    rt = config.rope_type
    if rt == "linear":
        inv_freq = (inv_freq / np.float32(rs["factor"])).astype(np.float32)
    elif rt == "llama3":
        factor = float(rs["factor"])
        low_freq_factor = float(rs["low_freq_factor"])
        high_freq_factor = float(rs["high_freq_factor"])
        old_context_len = float(rs["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)
    if config.rope_freq_factors is not None:
        inv_freq = (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    return inv_freq


def _rope_cos_sin(config: LlamaConfig, positions: Array) -> tuple[Array, Array]:
    """cos / sin tables [B, T, head_dim] (float32) for integer positions [B, T]."""
    inv_freq = jnp.asarray(rope_inv_freq(config))  # [hd/2]
    freqs = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x: [B, T, N, hd]; cos/sin: [B, T, hd]. HF "rotate_half" convention."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    c = cos[:, :, None, :]
    s = sin[:, :, None, :]
    return (x32 * c + rotated * s).astype(dtype)


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Llama RMSNorm: ``scale * x / sqrt(mean(x**2) + eps)`` (statistics in float32)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        scale = jnp.reshape(jnp.asarray(scale, self.dtype), (1,) * (x.ndim - 1) + (x.shape[-1],))
        return y * scale


def _dense(cfg: LlamaConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index):
        cfg = self.config
        B, T, _ = x.shape
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        G = H // KV
        # Project first, reshape the activations (never the kernels).
        q = _dense(cfg, H * hd, cfg.attention_bias, "q_proj")(x).reshape(B, T, H, hd)
        k = _dense(cfg, KV * hd, cfg.attention_bias, "k_proj")(x).reshape(B, T, KV, hd)
        v = _dense(cfg, KV * hd, cfg.attention_bias, "v_proj")(x).reshape(B, T, KV, hd)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)

        new_cache = None
        if layer_cache is not None:
            ck, cv = layer_cache  # [B, S, KV, hd]
            zero = jnp.zeros((), jnp.int32)
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (zero, cache_index, zero, zero))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (zero, cache_index, zero, zero))
            new_cache = (k, v)
            k = k.astype(cfg.dtype)
            v = v.astype(cfg.dtype)

        S = k.shape[1]
        qg = q.reshape(B, T, KV, G, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / math.sqrt(hd))
        scores = jnp.where(mask[:, None, None, :, :], scores, -1e30)  # mask: [B, T, S]
        probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        out = out.reshape(B, T, H * hd)
        del S
        out = _dense(cfg, cfg.hidden_size, cfg.attention_bias, "o_proj")(out)
        return out, new_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """One decoder block, written as a ``nn.scan`` body: (carry, xs) -> (carry, ys)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, cache_index):
        cfg = self.config
        norm = functools.partial(
            RMSNorm, eps=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        h, new_cache = LlamaAttention(cfg, name="self_attn")(
            norm(name="input_layernorm")(x), cos, sin, mask, layer_cache, cache_index
        )
        x = x + h
        x = x + LlamaMLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(x))
        return x, new_cache


class LlamaForCausalLM(nn.Module):
    """Llama decoder with LM head.

    ``__call__(input_ids, positions=None, cache=None, attention_mask=None)``:

    * ``input_ids``: int [B, T].
    * ``positions``: int [B, T] or [T] RoPE positions; default ``arange(T)``
      (offset by ``cache["index"]`` when a cache is given).
    * ``attention_mask``: optional [B, T] (no-cache path) or [B, S] (cache path) of
      valid key tokens (1 / True = attend); combined with the causal mask.
    * ``cache``: optional dict from :func:`init_cache`. Then returns
      ``(logits, new_cache)`` where ``new_cache["index"]`` advanced by ``T``.

    Returns float32 logits [B, T, V] (and the cache on the cache path).
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, positions=None, cache=None, attention_mask=None):
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        B, T = input_ids.shape
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.initializers.normal(0.02),
            name="embed_tokens",
        )
        x = embed(input_ids.astype(jnp.int32))

        if cache is not None:
            cache_index = jnp.asarray(cache["index"], jnp.int32)
            S = cache["k"].shape[2]
            layer_caches = (cache["k"], cache["v"])
        else:
            cache_index = jnp.zeros((), jnp.int32)
            S = T
            layer_caches = None

        if positions is None:
            positions = jnp.arange(T, dtype=jnp.int32)[None, :] + cache_index
            positions = jnp.broadcast_to(positions, (B, T))
        else:
            positions = jnp.asarray(positions, jnp.int32)
            if positions.ndim == 1:
                positions = positions[None, :]
            positions = jnp.broadcast_to(positions, (B, T))
        cos, sin = _rope_cos_sin(cfg, positions)

        # Causal mask over cache slots: query t (slot cache_index + t) sees slots <= it.
        q_slot = jnp.arange(T, dtype=jnp.int32)[:, None] + cache_index
        k_slot = jnp.arange(S, dtype=jnp.int32)[None, :]
        mask = jnp.broadcast_to((k_slot <= q_slot)[None, :, :], (B, T, S))
        if attention_mask is not None:
            am = jnp.asarray(attention_mask).astype(jnp.bool_)
            if am.shape != (B, S):
                raise ValueError(f"attention_mask must have shape {(B, S)}, got {am.shape}")
            mask = jnp.logical_and(mask, am[:, None, :])

        layer_cls = LlamaDecoderLayer
        if cfg.remat:
            layer_cls = nn.remat(layer_cls, prevent_cse=False)
        layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_hidden_layers,
        )(cfg, name="layers")
        x, new_layer_caches = layers(x, layer_caches, cos, sin, mask, cache_index)

        x = RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x)
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(
                cfg.vocab_size,
                use_bias=False,
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=nn.initializers.normal(0.02),
                name="lm_head",
            )(x)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        new_cache = {
            "k": new_layer_caches[0],
            "v": new_layer_caches[1],
            "index": cache_index + jnp.asarray(T, jnp.int32),
        }
        return logits, new_cache

    def init_params(self, key: Array, seq_len: int = 1) -> dict:
        """Random parameters (the ``"params"`` collection)."""
        ids = jnp.zeros((1, seq_len), jnp.int32)
        return self.init(key, ids)["params"]


def init_cache(
    config: LlamaConfig, batch_size: int, max_length: int, dtype: Dtype | None = None
) -> dict[str, Array]:
    """Static-shape KV cache: ``{"k", "v": [L, B, max_length, KV, hd], "index": int32 scalar}``."""
    dtype = config.dtype if dtype is None else dtype
    shape = (
        config.num_hidden_layers,
        batch_size,
        max_length,
        config.num_key_value_heads,
        config.head_dim,
    )
    return {
        "k": jnp.zeros(shape, dtype),
        "v": jnp.zeros(shape, dtype),
        "index": jnp.zeros((), jnp.int32),
    }


# --------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------


def _sample(logits: Array, temperature: float, key: Array | None) -> Array:
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("apply_fn", "config", "max_new_tokens", "temperature", "eos_ids")
)
def _generate_jit(apply_fn, config, params, prompt, key, max_new_tokens, temperature, eos_ids):
    B, T0 = prompt.shape
    total = T0 + max_new_tokens
    cache = init_cache(config, B, total)
    variables = {"params": params}
    logits, cache = apply_fn(variables, prompt, cache=cache)
    key, sub = jax.random.split(key)
    tok = _sample(logits[:, -1, :], temperature, sub)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)

    def is_eos(t):
        return jnp.any(t[:, None] == eos[None, :], axis=-1)

    out = jnp.zeros((B, total), jnp.int32)
    out = jax.lax.dynamic_update_slice(out, prompt, (0, 0))
    out = out.at[:, T0].set(tok)
    done = is_eos(tok)
    fill = jnp.asarray(eos_ids[0] if eos_ids else 0, jnp.int32)

    def cond(state):
        i, _, _, _, done, _ = state
        return jnp.logical_and(i < max_new_tokens, jnp.logical_not(jnp.all(done)))

    def body(state):
        i, out, cache, tok, done, key = state
        logits, cache = apply_fn(variables, tok[:, None], cache=cache)
        key, sub = jax.random.split(key)
        nxt = _sample(logits[:, -1, :], temperature, sub)
        nxt = jnp.where(done, fill, nxt)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (jnp.zeros((), jnp.int32), T0 + i))
        done = jnp.logical_or(done, is_eos(nxt))
        return i + 1, out, cache, nxt, done, key

    state = (jnp.ones((), jnp.int32), out, cache, tok, done, key)
    i, out, _, _, done, _ = jax.lax.while_loop(cond, body, state)
    # Positions never written (early stop once every row hit EOS) are filled with EOS.
    pos = jnp.arange(total, dtype=jnp.int32)[None, :]
    out = jnp.where(pos < T0 + i, out, fill)
    return out


def generate(
    model: LlamaForCausalLM,
    params,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    key: Array | None = None,
    eos_id: int | tuple[int, ...] | None = None,
    apply_fn: Callable | None = None,
):
    """Greedy (``temperature=0``) or sampled decoding with a static-shape KV cache.

    Args:
      model: the :class:`LlamaForCausalLM` (its config sizes the cache).
      params: the ``"params"`` collection (may contain custom pytree nodes such as
        ``LoraWeight`` when ``apply_fn`` understands them).
      prompt_ids: int [T] or [B, T] prompt tokens (no padding).
      max_new_tokens: number of tokens to generate.
      temperature: 0 for greedy argmax, else softmax sampling at this temperature.
      key: PRNG key (required when ``temperature > 0``).
      eos_id: token id(s) ending a sequence; once emitted the row is padded with
        the (first) EOS id and decoding stops early when every row is done.
      apply_fn: ``apply_fn(variables, input_ids, cache=cache) -> (logits, cache)``;
        defaults to ``model.apply`` (pass e.g. ``lora_jax.lora(model.apply)``).

    Returns:
      int32 tokens [B, T + max_new_tokens] (or [T + max_new_tokens] for a 1-D
      prompt): the prompt followed by the generated tokens.
    """
    prompt = jnp.asarray(prompt_ids, jnp.int32)
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None, :]
    if prompt.ndim != 2:
        raise ValueError(f"prompt_ids must be [T] or [B, T], got shape {prompt.shape}")
    if max_new_tokens < 1:
        return prompt[0] if squeeze else prompt
    temperature = float(temperature)
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if temperature > 0 and key is None:
        raise ValueError("a PRNG key is required when temperature > 0")
    if key is None:
        key = jax.random.key(0)
    if eos_id is None:
        eos_ids = ()
    elif isinstance(eos_id, (list, tuple)):
        eos_ids = tuple(int(e) for e in eos_id)
    else:
        eos_ids = (int(eos_id),)
    out = _generate_jit(
        model.apply if apply_fn is None else apply_fn,
        model.config,
        params,
        prompt,
        key,
        int(max_new_tokens),
        temperature,
        eos_ids,
    )
    return out[0] if squeeze else out


def from_pretrained(path, *, dtype=jnp.float32, **kwargs):
    """Loads ``(model, params)`` from an HF checkpoint dir or a ``.gguf`` file.

    See :func:`lora_jax.models.loading.from_pretrained`.
    """
    from lora_jax.models.loading import from_pretrained as _fp

    return _fp(path, dtype=dtype, **kwargs)
