"""Reference Llama-family decoder in Flax linen (the modules and the KV cache): Llama,
Mistral, Qwen2 and Qwen3, as :class:`~lora_jax.models.configs.LlamaConfig` describes them.

The parameter tree naming is a contract relied upon by the HF / PEFT mappings::

    {"embed_tokens": {"embedding": [V, D]},
     "layers": {  # nn.scan over layers; every leaf has a leading [L] axis
        "input_layernorm": {"scale": [L, D]},
        "self_attn": {"q_proj": {"kernel": [L, D, H*hd]}, "k_proj": {"kernel": [L, D, KV*hd]},
                      "v_proj": {"kernel": [L, D, KV*hd]}, "o_proj": {"kernel": [L, H*hd, D]}},
                      # + "bias" on q/k/v (qwen2, attention_bias: on o too);
                      # + "q_norm"/"k_norm": {"scale": [L, hd]} (qwen3)
        "post_attention_layernorm": {"scale": [L, D]},
        "mlp": {"gate_proj": {"kernel": [L, D, F]}, "up_proj": {"kernel": [L, D, F]},
                "down_proj": {"kernel": [L, F, D]}}},
     "norm": {"scale": [D]},
     "lm_head": {"kernel": [D, V]}}   # absent when tie_word_embeddings

Kernels are stored in (in, out) layout and are only ever consumed by
``nn.Dense`` (``dot_general``), ``nn.Embed`` (``jnp.take`` -> ``gather``) and
``nn.Embed.attend`` (``transpose`` + ``dot_general``), so that a LoRA
transform intercepting those primitives sees every use of every kernel.

Usage (loading lives in :mod:`lora_jax.models.loading`, decoding in
:mod:`lora_jax.models.decoding`)::

    model = LlamaForCausalLM(config)
    logits = model.apply({"params": params}, input_ids)                 # [B, T, V] float32
    cache = init_cache(config, batch_size=B, max_length=S)
    logits, cache = model.apply({"params": params}, ids, cache=cache)   # decoding path
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lora_jax.models.attention import attention
from lora_jax.models.configs import LlamaConfig
from lora_jax.models.rope import apply_rope, rope_cos_sin

__all__ = [
    "LlamaForCausalLM",
    "RMSNorm",
    "init_cache",
]

Array = jax.Array
Dtype = Any


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


def _norm(cfg: LlamaConfig, name: str) -> RMSNorm:
    return RMSNorm(cfg.rms_norm_eps, cfg.dtype, cfg.param_dtype, name=name)


class LlamaAttention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, cache_index):
        cfg = self.config
        B, T, _ = x.shape
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # Project first, reshape the activations (never the kernels).
        q = _dense(cfg, H * hd, cfg.qkv_bias, "q_proj")(x).reshape(B, T, H, hd)
        k = _dense(cfg, KV * hd, cfg.qkv_bias, "k_proj")(x).reshape(B, T, KV, hd)
        v = _dense(cfg, KV * hd, cfg.qkv_bias, "v_proj")(x).reshape(B, T, KV, hd)
        if cfg.qk_norm:
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        new_cache = None
        if layer_cache is not None:
            ck, cv = layer_cache  # [B, S, KV, hd]
            zero = jnp.zeros((), jnp.int32)
            at = (zero, cache_index, zero, zero)
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), at)
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), at)
            new_cache = (k, v)
            k = k.astype(cfg.dtype)
            v = v.astype(cfg.dtype)

        # without a cache the mask is causal (and padding): skip the blocks above the diagonal
        out = attention(q, k, v, mask, causal=layer_cache is None)  # mask: [B, T, S]
        out = out.reshape(B, T, H * hd)
        out = _dense(cfg, cfg.hidden_size, cfg.attention_bias, "o_proj")(out)
        return out, new_cache


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x)
        up = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x)
        return _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")(swiglu(gate, up))


@jax.custom_vjp
def swiglu(gate: Array, up: Array) -> Array:
    """``silu(gate) * up``, whose backward pass keeps only gate and up.

    Differentiated by JAX it also keeps ``silu(gate)`` (and, scanned, as a stacked [L, T, F]
    buffer zero-filled and written each step); the sigmoid is cheaper to recompute.
    """
    return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dy):
    gate, up = (r.astype(jnp.float32) for r in res)
    dy = dy.astype(jnp.float32)
    sig = jax.nn.sigmoid(gate)
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    return dgate.astype(res[0].dtype), (dy * gate * sig).astype(res[1].dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class LlamaDecoderLayer(nn.Module):
    """One decoder block, written as a ``nn.scan`` body: (carry, xs) -> (carry, ys)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, mask, cache_index):
        cfg = self.config
        h, new_cache = LlamaAttention(cfg, name="self_attn")(
            _norm(cfg, "input_layernorm")(x), cos, sin, mask, layer_cache, cache_index
        )
        x = x + h
        x = x + LlamaMLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x))
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
        cos, sin = rope_cos_sin(cfg, _positions(positions, B, T, cache_index))
        mask = _attention_mask(attention_mask, B, T, S, cache_index, cfg.sliding_window)

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

        x = _norm(cfg, "norm")(x)
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


def _positions(positions, B: int, T: int, cache_index: Array) -> Array:
    """RoPE positions [B, T]: ``arange(T)`` after the cached tokens unless given ([T] or [B, T])."""
    if positions is None:
        positions = jnp.arange(T, dtype=jnp.int32)[None, :] + cache_index
        return jnp.broadcast_to(positions, (B, T))
    positions = jnp.asarray(positions, jnp.int32)
    if positions.ndim == 1:
        positions = positions[None, :]
    return jnp.broadcast_to(positions, (B, T))


def _attention_mask(attention_mask, B: int, T: int, S: int, cache_index: Array,
                    window: int | None = None) -> Array:
    """[B, T, S]: query t (cache slot ``cache_index + t``) sees slots <= it (and, with a
    sliding ``window``, above ``it - window``) and valid keys."""
    q_slot = jnp.arange(T, dtype=jnp.int32)[:, None] + cache_index
    k_slot = jnp.arange(S, dtype=jnp.int32)[None, :]
    seen = k_slot <= q_slot
    if window is not None:
        seen &= k_slot > q_slot - window
    mask = jnp.broadcast_to(seen[None, :, :], (B, T, S))
    if attention_mask is None:
        return mask
    am = jnp.asarray(attention_mask).astype(jnp.bool_)
    if am.shape != (B, S):
        raise ValueError(f"attention_mask must have shape {(B, S)}, got {am.shape}")
    return jnp.logical_and(mask, am[:, None, :])


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
