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
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

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


def with_answer(example: Mapping, answer: str) -> dict:
    """``example`` with its (last) answer replaced by ``answer``."""
    if "messages" in example:
        msgs = [dict(m) for m in example["messages"]]
        msgs[-1]["content"] = answer
        return {"messages": msgs, "completion": answer}
    return {"prompt": example["prompt"], "completion": answer}


def _chat_tokens(tokenizer, messages, add_end: bool) -> tuple[list[int], list[int]]:
    # The template renders the whole conversation once, each answer a placeholder; the text
    # between answers is tokenized on its own, each answer (its content and the end-of-turn
    # token the template writes after it) apart: where chat markers are special tokens this
    # equals tokenizing the whole conversation, and the answer tokens are known exactly.
    eot_ids, eot = tokenizer.end_of_turn
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    marks = {i: f"\x00answer {k}\x00" for k, i in enumerate(turns)}
    marked = tokenizer.apply_chat_template(
        [dict(m, content=marks[i]) if i in marks else m for i, m in enumerate(messages)],
        add_generation_prompt=False)
    pieces = re.split("(\x00answer \\d+\x00)", marked)     # text, mark, text, mark, ..., text
    contents = [messages[i]["content"] for i in turns]
    if pieces[1::2] != list(marks.values()):
        raise ValueError("the chat template does not render every assistant turn once, in "
                         "order; use prompt/completion rows")
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    if full != "".join(p if k % 2 == 0 else contents[k // 2] for k, p in enumerate(pieces)):
        raise ValueError("the chat template rewrites assistant content (it trims whitespace "
                         "or splits out reasoning); give each answer as the template renders "
                         "it, or use prompt/completion rows")
    ids, mask = [], []
    for k, content in enumerate(contents):
        # answers are tokenized alone, as the scorer and generation see them
        pre = tokenizer.encode(pieces[2 * k], add_bos=None if k == 0 else False)
        after = pieces[2 * k + 2]
        j = after.find(eot) if eot else -1
        closed = j >= 0 and not after[:j].strip()    # only spacing before the end of turn
        last = k + 1 == len(contents)
        answer, extra = content, []
        if closed and (add_end or not last):
            answer = content + after[:j + len(eot)]
            pieces[2 * k + 2] = after[j + len(eot):]
        elif last and add_end:
            extra = eot_ids            # the template writes no end of turn: the model must stop
        ans = tokenizer.encode(answer, add_bos=False) + extra
        ids += pre + ans
        mask += [0] * len(pre) + [1] * len(ans)
    return ids, mask


def tokenize_example(tokenizer, example: Mapping, *, add_end: bool = True
                     ) -> tuple[list[int], list[int]]:
    """``(token ids, 1 where the token is an answer token)`` of one chat-framed example."""
    if "messages" in example:
        return _chat_tokens(tokenizer, example["messages"], add_end)
    end = list(tokenizer.end_of_turn[0]) if add_end else []
    p = chat_prefix(tokenizer, example["prompt"])
    a = tokenizer.encode(example["completion"], add_bos=False) + end
    return p + a, [0] * len(p) + [1] * len(a)


def tokenize_examples(tokenizer, examples: Sequence[Mapping], *, add_end: bool = True
                      ) -> list[tuple[list[int], list[int]]]:
    out = []
    for ex in examples:
        try:
            out.append(tokenize_example(tokenizer, ex, add_end=add_end))
        except ValueError as e:         # the template's refusal, naming the example
            turns = ex.get("messages") or [{"role": "user", "content": ex.get("prompt", "")}]
            text = next((m["content"] for m in turns if m["role"] == "user"), "")
            raise ValueError(f"{e} (in the example whose user turn starts {text[:60]!r})"
                             ) from None
    return out


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
    return [tokenizer.encode(c, add_bos=False) for c in candidates]
