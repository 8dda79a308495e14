"""Shared by the recipe tests: a tiny random Llama written as an HF checkpoint dir (with a
trained BPE tokenizer and a ChatML template) and a small sentiment-like JSONL task."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import lora_jax as lj
from helpers import LLAMA3_SPECIAL, LLAMA3_TEMPLATE, bpe_tokenizer
from lora_jax.models import LlamaConfig, LlamaForCausalLM

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

WORDS = ["good", "great", "fine", "superb", "bad", "awful", "dull", "poor", "film", "plot",
         "the", "was", "very", "acting", "movie", "story"]


def _tokenizer(tmp_path, template="chatml"):
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tcfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}
    if template == "llama3":
        special += LLAMA3_SPECIAL
        tcfg = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "chat_template": LLAMA3_TEMPLATE}
    corpus = [" ".join(WORDS), "yes no positive negative user assistant system"] * 4
    tk = bpe_tokenizer(corpus, special, 300)
    tk.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return tk.get_vocab_size()


def _tiny_hf_dir(tmp_path, embed_scale=1.0, model_type="llama", template="chatml"):
    """A random tiny Llama (or another ``model_type`` of the family); ``embed_scale`` widens its
    (tied) embeddings: at init scale its logits span well under one nat, too little for a few
    LoRA steps to learn a task."""
    d = tmp_path / f"tiny-{model_type}"
    vocab = _tokenizer(tmp_path, template)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      eos_token_id=2, bos_token_id=1, model_type=model_type)
    params = LlamaForCausalLM(cfg).init_params(jax.random.key(0), 4)
    params["embed_tokens"]["embedding"] *= embed_scale
    lj.export_merged(params, d)                      # HF names, (out, in) layout
    (d / "config.json").write_text(json.dumps(cfg.to_hf()))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).rename(d / name)
    return d


def _jsonl(tmp_path, n=48):
    rng = np.random.default_rng(0)
    pos, neg = WORDS[:4], WORDS[4:8]
    path = tmp_path / "data.jsonl"
    lines = []
    for i in range(n):
        good = i % 2 == 0
        words = " ".join(rng.choice(pos if good else neg, 3))
        lines.append(json.dumps({"prompt": f"the movie was {words} {i}",
                                 "completion": "positive" if good else "negative"}))
    path.write_text("\n".join(lines + [lines[0]]) + "\n")   # one exact duplicate
    return path


@pytest.fixture(scope="session")
def setup(tmp_path_factory):
    """``(model_dir, data.jsonl, a scratch dir)``."""
    tmp = tmp_path_factory.mktemp("cli")
    return _tiny_hf_dir(tmp), _jsonl(tmp), tmp


@pytest.fixture
def family_setup(tmp_path):
    """``(model_type, template) -> (model_dir, data.jsonl)``: ``setup`` with another
    architecture or chat template ("chatml", "llama3")."""
    return lambda model_type="llama", template="chatml": (
        _tiny_hf_dir(tmp_path, model_type=model_type, template=template), _jsonl(tmp_path))


@pytest.fixture(scope="session")
def learnable_base(tmp_path_factory):
    """A tiny model whose logits span enough to learn ``setup``'s task in 100 LoRA steps."""
    return _tiny_hf_dir(tmp_path_factory.mktemp("learnable"), embed_scale=8.0)
