"""Examples to fixed-length token rows: chat framing, answer masks, a shared prefix.

Every example is framed with the tokenizer's chat template: ``{"prompt", "completion"}``
as one user turn and the assistant's answer, a chat ``{"messages": [...]}`` turn by turn.
The answer tokens (every assistant turn's content and its end-of-turn token) are the only
ones carrying loss. :func:`encode_rows` right-pads / truncates every row to one fixed
length (so a jitted step compiles once), after a prefix all rows share (the system turn
and any fixed instruction), which runs once per batch. The files themselves are read by
:mod:`~lora_jax.recipes.finetune.sources`.

Example::

    >>> enc = encode_rows([([7, 8, 9, 4, 5], [0, 0, 0, 1, 1])], 6, prefix_len=1)
    >>> enc.prefix.tolist(), enc.ids.tolist(), enc.loss_mask.tolist()
    ([7], [[8, 9, 4, 5, 0]], [[0.0, 1.0, 1.0, 0.0, 0.0]])
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

import numpy as np

from lora_jax.models import format_chatml

__all__ = [
    "Encoded",
    "answer_token_ids",
    "chat_prefix",
    "common_prefix_len",
    "encode_examples",
    "encode_rows",
    "prompt_ids",
    "tokenize_example",
    "tokenize_examples",
    "with_answer",
]

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
    """The tokens of ``prompt`` as a user turn, up to the assistant's header."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         add_generation_prompt=True)
    return tokenizer.encode(text)


def _end_ids(tokenizer) -> list[int]:
    eot = tokenizer.token_to_id("<|im_end|>")
    if eot is None:
        eot = tokenizer.eos_id
    return [] if eot is None else [int(eot)]


def with_answer(example: Mapping, answer: str) -> dict:
    """``example`` with its (last) answer replaced by ``answer``."""
    if "messages" in example:
        msgs = [dict(m) for m in example["messages"]]
        msgs[-1]["content"] = answer
        return {"messages": msgs, "completion": answer}
    return {"prompt": example["prompt"], "completion": answer}


def _chat_tokens(tokenizer, messages, end: list[int]) -> tuple[list[int], list[int]]:
    # Each stretch between answers is templated and tokenized on its own, the answers
    # separately: the chat markers are special tokens, so this equals tokenizing the
    # whole conversation, and the answer tokens are known exactly.
    ids, mask, start = [], [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if start == 0:   # the conversation's start (with the template's default system turn)
            pre = tokenizer.encode(tokenizer.apply_chat_template(messages[:i]))
        else:            # after the previous answer's end-of-turn token
            pre = tokenizer.encode("\n" + format_chatml(messages[start:i]), add_bos=False)
        last = i + 1 == len(messages)
        ans = tokenizer.encode(m["content"]) + (end if last else _end_ids(tokenizer))
        ids += pre + ans
        mask += [0] * len(pre) + [1] * len(ans)
        start = i + 1
    return ids, mask


def tokenize_example(tokenizer, example: Mapping, *, add_end: bool = True
                     ) -> tuple[list[int], list[int]]:
    """``(token ids, 1 where the token is an answer token)`` of one chat-framed example."""
    end = _end_ids(tokenizer) if add_end else []
    if "messages" in example:
        return _chat_tokens(tokenizer, example["messages"], end)
    p = chat_prefix(tokenizer, example["prompt"])
    a = tokenizer.encode(example["completion"]) + end
    return p + a, [0] * len(p) + [1] * len(a)


def tokenize_examples(tokenizer, examples: Sequence[Mapping], *, add_end: bool = True
                      ) -> list[tuple[list[int], list[int]]]:
    return [tokenize_example(tokenizer, ex, add_end=add_end) for ex in examples]


def prompt_ids(item: tuple[list[int], list[int]]) -> list[int]:
    """The tokens before the first answer token."""
    ids, mask = item
    return ids[: mask.index(1)] if 1 in mask else list(ids)


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


def _last_answer(mask: list[int]) -> int:
    """Where the trailing run of answer tokens starts."""
    k = len(mask)
    while k > 0 and mask[k - 1]:
        k -= 1
    return k


def encode_rows(items: Sequence[tuple[list[int], list[int]]], seq_len: int, *,
                prefix_len: int = 0, pad_id: int = 0) -> Encoded:
    """Split off ``prefix_len`` shared tokens, truncate and right-pad the rest to
    ``seq_len - prefix_len``. ``items`` are ``(ids, answer mask)``. A row too long loses
    tokens from the middle of what precedes its last answer (earlier answers keep their
    mask; the head and the tail -- the end of the user turn and the assistant header --
    are kept), never from the last answer."""
    if not items:
        raise ValueError("no examples to encode")
    t = seq_len - prefix_len
    prefix = np.asarray(items[0][0][:prefix_len], np.int32)
    n = len(items)
    ids = np.full((n, t), pad_id, np.int32)
    mask = np.zeros((n, t), np.float32)
    truncated = 0
    for j, (row, ans) in enumerate(items):
        if list(row[:prefix_len]) != list(prefix) or 1 in ans[:prefix_len + 1]:
            raise ValueError(f"example {j} does not start with the shared prefix")
        k = _last_answer(ans)
        p, pm = list(row[prefix_len:k]), list(ans[prefix_len:k])
        if len(row) - k + 2 > t:
            raise ValueError(f"seq_len {seq_len} (shared prefix {prefix_len}) cannot hold the "
                             f"answer of example {j} ({len(row) - k} tokens); raise --seq-len")
        room = t - (len(row) - k)
        if len(p) > room:
            truncated += 1
            keep_tail = min(len(p) // 2, max(room // 2, 24), room - 1)
            cut = slice(room - keep_tail, len(p) - keep_tail)
            del p[cut], pm[cut]
        r, rm = p + list(row[k:]), pm + list(ans[k:])
        ids[j, : len(r)] = r
        mask[j, : len(r) - 1] = rm[1:]
    return Encoded(prefix, ids, mask, truncated)


def encode_examples(tokenizer, examples: Sequence[Mapping], seq_len: int, *,
                    prefix_len: int = 0, add_end: bool = True) -> Encoded:
    """Chat-frame, tokenize, truncate and right-pad ``examples`` (see :func:`encode_rows`)."""
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    return encode_rows(tokenize_examples(tokenizer, examples, add_end=add_end), seq_len,
                       prefix_len=prefix_len, pad_id=pad)


def answer_token_ids(tokenizer, candidates: Sequence[str]) -> list[list[int]]:
    return [tokenizer.encode(c) for c in candidates]
