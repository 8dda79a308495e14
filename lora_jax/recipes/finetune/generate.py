"""``lora-jax generate``: a run's answer to one prompt, streamed as it is produced.

The prompt becomes a user turn of the model's chat template (as in training; ``chat=False``
sends it as plain text) and the answer is decoded with a KV cache, one forward per new
token (:func:`lora_jax.models.stream_tokens`), until the end-of-turn / EOS token.
:class:`TextStream` turns the growing token list into text pieces that can be printed at
once: a byte-level BPE token may hold part of a UTF-8 character, so text is only released
once it decodes cleanly, and the pieces always add up to ``tokenizer.decode(tokens)``.

Example::

    run = load_run("runs/finetune")
    text, tokens = generate_text(run, "Is this review fresh or rotten? ...",
                                 on_text=lambda s: print(s, end="", flush=True))
"""

from __future__ import annotations

import math
from typing import Callable

import jax

from lora_jax.models import stream_tokens
from lora_jax.recipes.finetune.data import chat_prefix
from lora_jax.recipes.finetune.runs import Run

__all__ = ["TextStream", "check_generate_flags", "generate_text", "prompt_tokens", "stop_ids"]


class TextStream:
    """Incremental detokenization: :meth:`push` a token, get the text it completes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""

    def _advance(self, final: bool) -> str:
        text = self.tokenizer.decode(self.tokens)
        # U+FFFD at the end: an incomplete UTF-8 sequence whose next bytes are still to come
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.text):   # a decoder that rewrites earlier text
            return ""
        piece, self.text = text[len(self.text):], text
        return piece

    def push(self, token: int) -> str:
        self.tokens.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (call once, after the last token)."""
        return self._advance(final=True)


def stop_ids(tokenizer, model) -> tuple[int, ...]:
    """Tokens that end an answer: the chat template's end of turn and the tokenizer's /
    model's EOS."""
    eos = model.config.eos_token_id
    ids = [*tokenizer.end_of_turn[0], tokenizer.eos_id,
           *(eos if isinstance(eos, (list, tuple)) else (eos,))]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))


def check_generate_flags(max_new_tokens, temperature, top_p) -> None:
    """``ValueError`` naming the first bad decoding setting."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), "
                         f"got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"--top-p must be in (0, 1], got {top_p!r}")
    if top_p < 1 and temperature == 0:
        raise ValueError(f"--top-p {top_p} samples, but --temperature is 0 (greedy); pass "
                         f"--temperature > 0 too (e.g. 0.7)")


def prompt_tokens(run: Run, prompt: str, *, chat: bool = True) -> list[int]:
    """``prompt`` as a chat-framed user turn (as in training), or as plain text."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty; pass the text to answer")
    return chat_prefix(run.tokenizer, prompt) if chat else run.tokenizer.encode(prompt)


def generate_text(run: Run, prompt: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
                  top_p: float = 1.0, seed: int = 0, chat: bool = True,
                  on_text: Callable[[str], object] | None = None) -> tuple[str, list[int]]:
    """``(answer text, answer tokens)``: greedy by default, else sampled at ``temperature``
    from the top-``top_p`` nucleus with ``jax.random.key(seed)``; ``on_text`` receives each
    piece of text as soon as it is final. The stop token, when reached, ends ``tokens``
    (it is not part of the text)."""
    check_generate_flags(max_new_tokens, temperature, top_p)
    ids = prompt_tokens(run, prompt, chat=chat)
    stream = TextStream(run.tokenizer)
    emit = on_text if on_text is not None else (lambda _: None)
    for t in stream_tokens(run.model, run.params, ids, max_new_tokens,
                           temperature=float(temperature), top_p=float(top_p),
                           key=jax.random.key(seed), eos_id=stop_ids(run.tokenizer, run.model),
                           apply_fn=run.apply_fn):
        piece = stream.push(t)
        if piece:
            emit(piece)
    rest = stream.flush()
    if rest:
        emit(rest)
    return stream.text, stream.tokens
