"""Rotary position embeddings (RoPE) of Llama: frequencies incl. scaling, tables, rotation.

Example:
    >>> from lora_jax.models.configs import LlamaConfig
    >>> cfg = LlamaConfig(vocab_size=7, hidden_size=8, intermediate_size=5,
    ...                   num_hidden_layers=1, num_attention_heads=2, rope_theta=16.0)
    >>> rope_inv_freq(cfg).tolist()      # theta ** -(2i / head_dim), head_dim 4
    [1.0, 0.25]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.models.configs import LlamaConfig

__all__ = ["rope_inv_freq", "rope_cos_sin", "apply_rope"]


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
        inv_freq = _llama3_scaling(inv_freq, rs)
    if config.rope_freq_factors is not None:
        inv_freq = (inv_freq / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    return inv_freq


def _llama3_scaling(inv_freq: np.ndarray, rs: dict) -> np.ndarray:
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
    return np.where(is_medium, smoothed, inv_freq_llama).astype(np.float32)


def rope_cos_sin(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos / sin tables [B, T, head_dim] (float32) for integer positions [B, T]."""
    inv_freq = jnp.asarray(rope_inv_freq(config))  # [hd/2]
    freqs = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [B, T, N, hd]; cos/sin: [B, T, hd]. HF "rotate_half" convention."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    half = x32.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    c = cos[:, :, None, :]
    s = sin[:, :, None, :]
    return (x32 * c + rotated * s).astype(dtype)
