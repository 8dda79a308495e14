"""``lora-jax eval``: a finished run scored on its held-out split, rebuilt from ``run.json``.

The split is the one training held out (same data, ``eval_size`` and split seed; a
smaller ``eval_size`` takes part of it, never a trained-on example). Classification data
(2..16 distinct completions) is scored by :class:`~lora_jax.recipes.finetune.scoring.Scorer`,
exactly as training reports it; open-ended data by

* :func:`heldout_loss`: the mean next-token loss over the answer tokens (end of turn
  included), the training loss on held-out rows;
* :func:`exact_match`: the fraction of greedy generations equal to the completion.

Both are plain functions that a training loop can call too.

Example::

    evaluate_run("runs/finetune")       # {"task": "classification", "accuracy": 0.87, ...}
"""

from __future__ import annotations

import functools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.lora import lora
from lora_jax.models import generate_batch
from lora_jax.recipes.finetune.config import FinetuneConfig
from lora_jax.recipes.finetune.data import (
    Encoded,
    common_prefix_len,
    encode_examples,
    prompt_ids,
    tokenize_example,
    tokenize_examples,
)
from lora_jax.recipes.finetune.generate import stop_ids
from lora_jax.recipes.finetune.runs import Run, check_run_dir, load_run
from lora_jax.recipes.finetune.scoring import Scorer, answer_positions, make_logits_at
from lora_jax.recipes.finetune.sources import load_examples

__all__ = ["answer_prompt", "evaluate_run", "exact_match", "heldout_loss", "heldout_split",
           "shared_prefix_len"]


@functools.partial(jax.jit, static_argnames="logits_fn")
def _nll_sum(logits_fn, params, ids, pos, tgt, valid):
    lp = jax.nn.log_softmax(logits_fn(params, ids, pos), axis=-1)
    nll = -jnp.take_along_axis(lp, tgt[:, :, None], axis=-1)[:, :, 0]
    return jnp.sum(nll * valid)


def heldout_loss(logits_fn: Callable, params, enc: Encoded, *, batch: int = 50) -> float:
    """Mean next-token loss (nats per answer token) of the rows ``enc``.

    ``logits_fn(params, ids [B, T], pos [B, K]) -> logits [B, K, V]`` at the given positions
    (raw or log-softmaxed: e.g. ``lora(make_logits_at(model, enc.prefix))``, the training
    loss's function, or the :class:`Scorer`'s); ``enc`` from
    :func:`~lora_jax.recipes.finetune.data.encode_examples` with ``add_end=True``. Runs
    ``batch`` rows at a time (the last batch padded, so one shape compiles).
    """
    pos, valid = answer_positions(enc.loss_mask)
    tgt = np.take_along_axis(enc.ids, pos + 1, axis=1)
    n = enc.ids.shape[0]
    total = 0.0
    for s in range(0, n, batch):
        rows = [a[s: s + batch] for a in (enc.ids, pos, tgt, valid)]
        pad = batch - rows[0].shape[0]
        if pad:   # repeated rows that count for nothing
            rows = [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in rows]
            rows[3][batch - pad:] = 0.0
        total += float(_nll_sum(logits_fn, params, *rows))
    return total / max(float(valid.sum()), 1.0)


def exact_match(model, params, tokenizer, examples: Sequence[Mapping], *,
                max_new_tokens: int | None = None, batch: int = 16,
                apply_fn: Callable | None = None) -> float:
    """Fraction of ``examples`` whose greedy answer (chat-framed prompt, decoded up to the
    end of turn, whitespace-stripped) equals the stripped ``completion``.

    ``max_new_tokens`` defaults to the longest completion's token count + 1 (room for the
    end of turn: a longer answer cannot match). ``apply_fn`` as in
    :func:`lora_jax.models.generate` (``lora(model.apply)`` for a LoRA'd tree).
    """
    if not examples:
        raise ValueError("exact_match needs at least one example")
    if max_new_tokens is None:
        max_new_tokens = 1 + max(len(tokenizer.encode(e["completion"])) for e in examples)
    prompts = [answer_prompt(tokenizer, e) for e in examples]
    outs = generate_batch(model, params, prompts, max_new_tokens, batch_size=batch,
                          eos_id=stop_ids(tokenizer, model), apply_fn=apply_fn)
    hits = [tokenizer.decode(o).strip() == e["completion"].strip()
            for o, e in zip(outs, examples)]
    return float(np.mean(hits))


def answer_prompt(tokenizer, example: Mapping) -> list[int]:
    """The chat-framed tokens before ``example``'s (last) answer, assistant header included."""
    ids, mask = tokenize_example(tokenizer, example, add_end=False)
    start = len(mask)
    while start and mask[start - 1]:        # back over the last answer's tokens
        start -= 1
    return ids[:start]


def shared_prefix_len(tokenizer, examples: Sequence[Mapping], seq_len: int) -> int:
    """The token prefix every chat-framed prompt shares, as training splits it off (it
    decides where a too-long prompt is cut, so scores match training's)."""
    n = common_prefix_len(prompt_ids(it) for it in tokenize_examples(tokenizer, examples))
    return n if seq_len - n >= 8 else max(0, seq_len - 8)


def heldout_split(cfg: FinetuneConfig, eval_size: int | None = None
                  ) -> tuple[str, list[dict], list[dict]]:
    """``(data name, train, held_out)`` of the run ``cfg``; ``eval_size`` (at most the run's)
    keeps part of the held-out examples."""
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    name, _, train, held = load_examples(cfg.data, cfg.eval_size, seed=seed)
    if eval_size is None or eval_size == cfg.eval_size:
        return name, train, held
    if isinstance(eval_size, bool) or not isinstance(eval_size, int) or \
            not 1 <= eval_size <= cfg.eval_size:
        raise ValueError(f"--eval-size must be an integer in 1..{cfg.eval_size} (the run held "
                         f"out {cfg.eval_size}; more would score trained-on examples), "
                         f"got {eval_size!r}")
    if eval_size >= len(held):
        return name, train, held
    _, _, _, part = load_examples(cfg.data, eval_size, seed=seed)
    if not {e["prompt"] for e in part} <= {e["prompt"] for e in held}:
        part = held[:eval_size]   # the smaller split drew other examples: keep held-out ones
    return name, train, part


def evaluate_run(run, *, eval_size: int | None = None, adapter: bool = True) -> dict:
    """Held-out scores of a run: a :class:`Run`, or the directory to load it from
    (``adapter=False``: its base). The task is a classification when the run's data has
    2..16 distinct completions, else open-ended."""
    cfg = run.config if isinstance(run, Run) else check_run_dir(run)
    name, train, held = heldout_split(cfg, eval_size)   # bad flags fail before the model loads
    if not held:
        raise ValueError(f"{cfg.out}: the run has no held-out examples (--eval-size 0)")
    run = run if isinstance(run, Run) else load_run(run, adapter=adapter)
    tok = run.tokenizer
    prefix_len = shared_prefix_len(tok, train + held, cfg.seq_len)
    f = make_logits_at(run.model, answer_prompt(tok, held[0])[:prefix_len])
    f = lora(f) if run.implicit else f
    batch = min(cfg.eval_batch, len(held))
    logp = jax.jit(lambda p, ids, pos: jax.nn.log_softmax(f(p, ids, pos), axis=-1))
    res = {"data": name, "examples": len(held), "adapter": run.adapter}
    if 2 <= len({e["completion"] for e in train + held}) <= 16:
        scorer = Scorer(tok, held, cfg.seq_len, logp, batch, prefix_len=prefix_len)
        return {**res, "task": "classification", **scorer(run.params)}
    enc = encode_examples(tok, held, cfg.seq_len, prefix_len=prefix_len)
    em = exact_match(run.model, run.params, tok, held, batch=batch, apply_fn=run.apply_fn)
    return {**res, "task": "open-ended", "loss": heldout_loss(logp, run.params, enc, batch=batch),
            "accuracy": em, "scoring": "exact match of greedy generations (stripped text)"}
