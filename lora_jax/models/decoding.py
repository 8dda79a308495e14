"""Decoding with a static-shape KV cache: greedy or sampled, stopping early at EOS.

Example::

    tokens = generate(model, params, prompt_ids, max_new_tokens=20, eos_id=tokenizer.eos_id)
    tokens = generate(model, lora_params, prompt_ids, 20, apply_fn=lora_jax.lora(model.apply))
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from lora_jax.models.llama import LlamaForCausalLM, init_cache

__all__ = ["generate"]

Array = jax.Array


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
