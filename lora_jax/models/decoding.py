"""Decoding with a static-shape KV cache: greedy or sampled, stopping early at EOS.

:func:`generate` decodes a batch in one jitted loop; :func:`stream_tokens` yields one
sequence's tokens as they come (a python loop over a jitted single-token step, with
top-p sampling); :func:`generate_batch` decodes prompts of different lengths greedily,
left-padded into fixed-shape batches. ``adapter_ids=`` gives each row its own adapter of a
:func:`~lora_jax.stack_adapters` tree: one base pass per step plus each row's A/B.

Example::

    tokens = generate(model, params, prompt_ids, max_new_tokens=20, eos_id=tokenizer.eos_id)
    tokens = generate(model, lora_params, prompt_ids, 20, apply_fn=lora_jax.lora(model.apply))
    many = lora_jax.stack_adapters({"fr": fr_params, "de": de_params}, pad_ranks=True)
    tokens = generate(model, many, prompt_ids_3_rows, 20, adapter_ids=["de", None, "fr"])
    for t in stream_tokens(model, params, prompt_ids, 20, eos_id=tokenizer.eos_id):
        print(t)
"""

from __future__ import annotations

import functools
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.lora import lora
from lora_jax.models.llama import LlamaForCausalLM, init_cache
from lora_jax.variants import adapter_ids as _adapter_ids
from lora_jax.variants import with_adapter_ids

__all__ = ["generate", "generate_batch", "stream_tokens"]

Array = jax.Array


def _eos_tuple(eos_id) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    if isinstance(eos_id, (list, tuple)):
        return tuple(int(e) for e in eos_id)
    return (int(eos_id),)


@functools.lru_cache(maxsize=8)
def _lora_apply(model) -> Callable:
    # One function per model: jitted decoding keys its cache on apply_fn, so repeated calls
    # with adapter_ids (and no apply_fn) compile once.
    return lora(model.apply)


def _row_ids(where: str, params, ids, rows: int) -> np.ndarray:
    """``ids`` (one adapter name / index / None per prompt row) as int32 [rows], checked."""
    try:
        ids = _adapter_ids(params, np.asarray(ids).tolist() if hasattr(ids, "dtype") else ids)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: adapter_ids: {str(e).removeprefix('adapter_ids: ')}") from None
    if ids.shape[0] != rows:
        raise ValueError(f"{where}: adapter_ids has {ids.shape[0]} entries for {rows} prompt "
                         "rows; give one adapter name, index or None (base) per row.")
    return np.asarray(ids)


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
    adapter_ids: Sequence | None = None,
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
        defaults to ``model.apply`` (pass e.g. ``lora_jax.lora(model.apply)``), or to
        ``lora_jax.lora(model.apply)`` when ``adapter_ids`` is given.
      adapter_ids: for a :func:`~lora_jax.stack_adapters` tree, one adapter name, index
        or ``None`` (base) per prompt row, e.g. ``["de", None, "fr"]`` for 3 rows (through
        :func:`~lora_jax.with_adapter_ids`; ids are data: a new assignment never recompiles).

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
    if adapter_ids is not None:
        ids = _row_ids("generate", params, adapter_ids, prompt.shape[0])
        params, apply_fn = with_adapter_ids(params, ids), apply_fn or _lora_apply(model)
    if max_new_tokens < 1:
        return prompt[0] if squeeze else prompt
    temperature = float(temperature)
    if temperature < 0:
        raise ValueError("temperature must be >= 0")
    if temperature > 0 and key is None:
        raise ValueError("a PRNG key is required when temperature > 0")
    if key is None:
        key = jax.random.key(0)
    eos_ids = _eos_tuple(eos_id)
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


def _top_p(logits: Array, top_p: float) -> Array:
    """``logits`` with every token outside the nucleus set to -inf: the most likely tokens
    whose probabilities, taken in order, first reach ``top_p`` (the top token always stays)."""
    order = jnp.argsort(-logits, axis=-1)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    p = jax.nn.softmax(ranked, axis=-1)
    n_keep = jnp.sum((jnp.cumsum(p, axis=-1) - p) < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(ranked, jnp.maximum(n_keep - 1, 0), axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _next_token(apply_fn, params, ids, cache, key, temperature, top_p):
    """One forward of ``ids`` [1, T] through the cache and the token it picks. Temperature
    and top-p are traced: greedy and sampled decoding share one compiled step."""
    logits, cache = apply_fn({"params": params}, ids, cache=cache)
    key, sub = jax.random.split(key)   # the same key sequence as ``generate``
    last = logits[:, -1, :]
    greedy = jnp.argmax(last, axis=-1).astype(jnp.int32)
    scaled = last / jnp.maximum(temperature, 1e-6)
    nucleus = jnp.where(top_p < 1.0, _top_p(scaled, top_p), scaled)
    sampled = jax.random.categorical(sub, nucleus, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0.0, sampled, greedy), cache, key


def stream_tokens(
    model: LlamaForCausalLM,
    params,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    key: Array | None = None,
    eos_id: int | tuple[int, ...] | None = None,
    apply_fn: Callable | None = None,
) -> Iterator[int]:
    """Yield new tokens one by one as :func:`generate` produces them (one sequence).

    The prompt fills a KV cache in one forward; then each token costs one jitted
    single-token forward, handed to the caller before the next one starts. With the same
    arguments the tokens equal ``generate(...)[len(prompt):]`` up to the first EOS, which
    is yielded last. ``top_p < 1`` (with ``temperature > 0``) samples from the nucleus:
    the most likely tokens whose probabilities first reach ``top_p``.
    """
    prompt = jnp.asarray(prompt_ids, jnp.int32)
    if prompt.ndim != 1 or prompt.shape[0] < 1:
        raise ValueError(f"prompt_ids must be a non-empty [T] sequence, got shape {prompt.shape}")
    temperature, top_p = float(temperature), float(top_p)
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("a PRNG key is required when temperature > 0")
    eos = set(_eos_tuple(eos_id))
    apply_fn = model.apply if apply_fn is None else apply_fn
    temp, nucleus = jnp.float32(temperature), jnp.float32(top_p)

    def tokens():
        cache = init_cache(model.config, 1, prompt.shape[0] + int(max_new_tokens))
        ids, k = prompt[None, :], jax.random.key(0) if key is None else key
        for _ in range(int(max_new_tokens)):
            tok, cache, k = _next_token(apply_fn, params, ids, cache, k, temp, nucleus)
            t = int(tok[0])
            yield t
            if t in eos:
                return
            ids = tok[:, None]

    return tokens()


@functools.partial(jax.jit, static_argnames=("apply_fn", "config", "max_new_tokens", "eos_ids"))
def _greedy_padded(apply_fn, config, params, ids, pad, max_new_tokens, eos_ids):
    """Greedy tokens [B, max_new_tokens] after left-padded prompts ``ids`` [B, P]
    (``pad[b]`` padding slots, masked out; RoPE positions start at each prompt's first token)."""
    B, P = ids.shape
    slots = jnp.arange(P + max_new_tokens, dtype=jnp.int32)[None, :]
    valid = slots >= pad[:, None]
    variables = {"params": params}
    cache = init_cache(config, B, P + max_new_tokens)
    pos = jnp.maximum(slots[:, :P] - pad[:, None], 0)
    logits, cache = apply_fn(variables, ids, positions=pos, cache=cache, attention_mask=valid)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    fill = jnp.asarray(eos_ids[0] if eos_ids else 0, jnp.int32)

    def body(i, state):
        out, cache, tok, done = state
        out = out.at[:, i].set(jnp.where(done, fill, tok))
        done = jnp.logical_or(done, jnp.any(tok[:, None] == eos[None, :], axis=-1))
        logits, cache = apply_fn(variables, tok[:, None], positions=(P + i - pad)[:, None],
                                 cache=cache, attention_mask=valid)
        return out, cache, jnp.argmax(logits[:, -1], -1).astype(jnp.int32), done

    state = (jnp.zeros((B, max_new_tokens), jnp.int32), cache,
             jnp.argmax(logits[:, -1], -1).astype(jnp.int32), jnp.zeros((B,), jnp.bool_))
    return jax.lax.fori_loop(0, max_new_tokens, body, state)[0]


def generate_batch(
    model: LlamaForCausalLM,
    params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_id: int | tuple[int, ...] | None = None,
    batch_size: int = 16,
    apply_fn: Callable | None = None,
    adapter_ids: Sequence | None = None,
) -> list[list[int]]:
    """Greedy continuations of prompts of different lengths, ``batch_size`` at a time.

    Prompts are left-padded to the longest one (padding masked, positions shifted), so
    every batch has one shape and compiles once. Returns each prompt's new tokens, cut
    after its first EOS (included), as :func:`generate` greedy would produce them alone.
    ``adapter_ids`` (one adapter name, index or ``None`` per prompt) decodes each prompt
    with its own adapter of a :func:`~lora_jax.stack_adapters` tree, as in :func:`generate`.
    """
    if not prompts or min(len(p) for p in prompts) < 1:
        raise ValueError("prompts must be a non-empty list of non-empty token sequences")
    ids = None
    if adapter_ids is not None:
        ids = _row_ids("generate_batch", params, adapter_ids, len(prompts))
        apply_fn = apply_fn or _lora_apply(model)
    eos_ids = _eos_tuple(eos_id)
    width = max(len(p) for p in prompts)
    rows = np.zeros((len(prompts), width), np.int32)
    pad = np.array([width - len(p) for p in prompts], np.int32)
    for r, p in enumerate(prompts):
        rows[r, pad[r]:] = p
    out = []
    for s in range(0, len(prompts), batch_size):
        chunk = [a[s: s + batch_size] for a in (rows, pad, ids) if a is not None]
        n = chunk[0].shape[0]
        # one compiled shape: repeat the last row (and its adapter)
        chunk = [np.concatenate([a, np.repeat(a[-1:], batch_size - n, 0)]) for a in chunk]
        p = params if ids is None else with_adapter_ids(params, chunk[2])
        toks = np.asarray(_greedy_padded(model.apply if apply_fn is None else apply_fn,
                                         model.config, p, chunk[0], chunk[1],
                                         int(max_new_tokens), eos_ids))[:n]
        for row in toks.tolist():
            ends = [i for i, t in enumerate(row) if t in eos_ids]
            out.append(row[: ends[0] + 1] if ends else row)
    return out
