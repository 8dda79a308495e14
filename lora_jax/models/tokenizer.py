"""Tokenizers: a thin wrapper over ``tokenizers``, built from ``tokenizer.json`` or GGUF metadata.

:func:`load_tokenizer` takes an HF checkpoint directory (``tokenizer.json``,
``tokenizer_config.json``) or a ``.gguf`` file (byte-level BPE vocabulary and merges in
its metadata). :class:`Tokenizer` knows its BOS/EOS ids and formats chats with the model's
own Jinja chat template, rendered as transformers renders it (ChatML when there is none:
:meth:`Tokenizer.apply_chat_template`), and knows the token that ends an assistant turn
(:attr:`Tokenizer.end_of_turn`).

Example:
    >>> format_chatml([{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models as tk_models

from lora_jax.checkpoint import read_json
from lora_jax.models.gguf import gguf_field, is_gguf, open_gguf

__all__ = ["Tokenizer", "format_chatml", "load_tokenizer"]

PathLike = str | os.PathLike

_CHATML_SYSTEM_RE = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)

# The split of llama.cpp's "llama-bpe" pre-tokenizer (GPT-2's is ByteLevel's own regex).
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def format_chatml(
    messages: Iterable[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    default_system: str | None = None,
) -> str:
    """ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message.

    ``default_system`` is prepended as a system message when the first message is
    not a system message (SmolLM2's template does this).
    """
    messages = list(messages)
    parts = []
    if default_system is not None and (not messages or messages[0]["role"] != "system"):
        parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` plus special ids and chat template."""

    def __init__(
        self,
        backend,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
    ):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.chat_template = chat_template
        self.add_bos = add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        add_bos = self.add_bos if add_bos is None else add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return list(ids)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def default_system_prompt(self) -> str | None:
        """The system prompt a ChatML template inserts when none is given (if any)."""
        t = self.chat_template
        if not t or "messages[0]['role'] != 'system'" not in t:
            return None
        m = _CHATML_SYSTEM_RE.search(t)
        return m.group(1) if m else None

    def apply_chat_template(
        self,
        messages: Iterable[Mapping[str, str]],
        *,
        add_generation_prompt: bool = True,
        tokenize: bool = False,
    ):
        """``messages`` rendered by the chat template (ChatML without one); optionally
        tokenized. A template that raises (``raise_exception``), or fails to render, is a
        ``ValueError`` with its message."""
        messages = [dict(m) for m in messages]
        if not self.chat_template:
            text = format_chatml(messages, add_generation_prompt=add_generation_prompt)
        else:
            text = _render(self.chat_template, messages=messages,
                           add_generation_prompt=add_generation_prompt, tools=None,
                           documents=None, **self._special_tokens())
        return self.encode(text) if tokenize else text

    def _special_tokens(self) -> dict[str, str]:
        tok = self.backend.id_to_token
        return {name: tok(i) for name, i in (("bos_token", self.bos_id),
                                             ("eos_token", self.eos_id)) if i is not None}

    @functools.cached_property
    def end_of_turn(self) -> tuple[list[int], str]:
        """``(ids, text)`` of the token the template writes right after an assistant's
        answer (ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``, Mistral's ``</s>``), read
        off a rendered two-turn chat; the EOS token when the template writes no special token
        there (or cannot render that chat); ``([], "")`` without either."""
        mark = "\x00answer\x00"
        try:
            text = self.apply_chat_template([{"role": "user", "content": "question"},
                                             {"role": "assistant", "content": mark}],
                                            add_generation_prompt=False)
        except ValueError:
            text = ""
        rest = text.partition(mark)[2]
        specials = {t.content: i for i, t in self.backend.get_added_tokens_decoder().items()
                    if t.special}
        hits = [t for t in specials if rest.startswith(t)]
        if hits:
            t = max(hits, key=len)
            return [specials[t]], t
        if self.eos_id is None:
            return [], ""
        return [int(self.eos_id)], self.backend.id_to_token(self.eos_id) or ""


@functools.lru_cache(maxsize=8)
def _template(source: str):
    """A chat template compiled the way transformers compiles it (sandboxed, trimmed blocks,
    loop controls, its ``tojson``, ``raise_exception`` and ``strftime_now``)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask markers)
        renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body
                                          ).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def _render(source: str, **context) -> str:
    import jinja2
    try:
        return _template(source).render(**context)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"the chat template could not render these messages: "
                         f"{type(e).__name__}: {e}") from None


def _pre_tokenizer(pre: str):
    """The pre-tokenizer for llama.cpp's ``tokenizer.ggml.pre`` value."""
    if pre == "smollm":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in ("llama-bpe", "llama3", "smaug-bpe"):
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # "default", "gpt-2"


def _gguf_tokenizer(reader) -> Tokenizer:
    model = gguf_field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(
            f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')"
        )
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    merges = gguf_field(reader, "tokenizer.ggml.merges") or []
    types = gguf_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tk = HFTokenizer(tk_models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges]))
    tk.pre_tokenizer = _pre_tokenizer(gguf_field(reader, "tokenizer.ggml.pre", "default"))
    tk.decoder = decoders.ByteLevel()
    # CONTROL (3) -> special tokens matched atomically; USER_DEFINED (4) -> added tokens.
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == 4]
    if special:
        tk.add_special_tokens(special)
    if user:
        tk.add_tokens(user)
    bos = gguf_field(reader, "tokenizer.ggml.bos_token_id")
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return Tokenizer(
        tk,
        bos_id=None if bos is None else int(bos),
        eos_id=None if eos is None else int(eos),
        chat_template=gguf_field(reader, "tokenizer.chat_template"),
        add_bos=bool(gguf_field(reader, "tokenizer.ggml.add_bos_token", False)),
    )


def _json_object(path: Path) -> dict:
    """A JSON object file, or ``{}`` when absent; other content names the file."""
    if not path.exists():
        return {}
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not an object.")
    return obj


def _typed(obj: dict, key: str, ok, want: str, where: Path):
    v = obj.get(key)
    if v is not None and not ok(v):
        raise ValueError(f"{where}: key {key!r} is {str(v)[:80]!r} ({type(v).__name__}); "
                         f"it must be {want}.")
    return v


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_token(v) -> bool:
    return isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))


def _dir_tokenizer(path: Path) -> Tokenizer:
    try:
        backend = HFTokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # noqa: BLE001 - the tokenizers error, with the file's name
        raise ValueError(f"{path / 'tokenizer.json'} is not a readable tokenizers file: "
                         f"{str(e)[:300]}") from None
    cfg_path = path / "tokenizer_config.json"
    tcfg = _json_object(cfg_path)
    for key in ("bos_token", "eos_token"):
        _typed(tcfg, key, _is_token, "a string or an object with a string 'content'", cfg_path)

    def tok_id(v):
        if isinstance(v, dict):
            v = v.get("content")
        return None if v is None else backend.token_to_id(v)

    bos_id, eos_id = tok_id(tcfg.get("bos_token")), tok_id(tcfg.get("eos_token"))
    mcfg_path = path / "config.json"
    mcfg = _json_object(mcfg_path)  # the model config's ids fill what tokenizer_config lacks
    bos = _typed(mcfg, "bos_token_id", _is_id, "a non-negative int", mcfg_path)
    eos = _typed(mcfg, "eos_token_id", lambda v: _is_id(v) or (
        isinstance(v, list) and v and all(map(_is_id, v))), "an int or a list of ints", mcfg_path)
    bos_id = bos_id if bos_id is not None else bos
    if eos_id is None:
        eos_id = eos[0] if isinstance(eos, list) else eos
    template = tcfg.get("chat_template")
    tpath = path / "chat_template.jinja"
    if template is None and tpath.exists():
        template = tpath.read_text()
    return Tokenizer(
        backend,
        bos_id=bos_id,
        eos_id=eos_id,
        chat_template=template if isinstance(template, str) else None,
        add_bos=bool(tcfg.get("add_bos_token", False)),
    )


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Tokenizer from a checkpoint dir (``tokenizer.json``) or a ``.gguf`` file's metadata."""
    path = Path(path)
    if is_gguf(path):
        return _gguf_tokenizer(open_gguf(path))
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"{path} has no tokenizer.json (and is not a .gguf file)")
    return _dir_tokenizer(path)
