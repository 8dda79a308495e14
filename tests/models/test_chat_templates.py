# ruff: noqa: E501 (the Qwen2.5 template below keeps its own long lines)
"""Chat templates render as transformers renders them (Jinja, sandboxed), the end-of-turn token is
read off the template, and chat rows mask exactly each answer and its end-of-turn token, for
Llama 3, Mistral and Qwen2.5 style templates, not only ChatML."""

import importlib.util

import pytest

from helpers import LLAMA3_SPECIAL, LLAMA3_TEMPLATE, bpe_tokenizer, masked_runs
from lora_jax.models import format_chatml, load_tokenizer
from lora_jax.models.tokenizer import Tokenizer
from lora_jax.recipes.finetune.data import tokenize_example

SPECIAL = LLAMA3_SPECIAL + ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]

LLAMA3 = LLAMA3_TEMPLATE
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
           "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
           "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == "
           "'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only "
           "user and assistant roles are supported!') }}{% endif %}{% endfor %}")
# Qwen2.5 Instruct's template without its tool-calling branches, its lines as they are
QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
GENERATION = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
              "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}"
              "{% endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}"
              "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}"
              "{{ '<|im_start|>assistant\\n' }}{% endif %}")
# (template, bos, eos, the end-of-turn token read off it)
TEMPLATES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "mistral": (MISTRAL, "<s>", "</s>", "</s>"),
    "qwen2.5": (QWEN25, None, "<|im_end|>", "<|im_end|>"),
    "generation-tags": (GENERATION, None, "<|im_end|>", "<|im_end|>"),
    "llama2-spaced-eos": ("{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + "
                          "'[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + "
                          "m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}",
                          "<s>", "</s>", "</s>"),
}
CHATS = [
    [{"role": "user", "content": "is the plot good?"},
     {"role": "assistant", "content": "yes, very good"}],
    [{"role": "user", "content": "good film?"}, {"role": "assistant", "content": "no"},
     {"role": "user", "content": "why not?"},
     {"role": "assistant", "content": "the plot was dull and the acting poor"}],
]
SYSTEM = [{"role": "system", "content": "answer briefly"}]


@pytest.fixture(scope="module")
def backend():
    text = "the plot was good bad dull and acting poor film why not yes no very answer briefly"
    return bpe_tokenizer([text, "user assistant system INST"] * 3, SPECIAL, 320)


def _tok(backend, name):
    template, bos, eos, _ = TEMPLATES[name]
    tid = backend.token_to_id
    return Tokenizer(backend, bos_id=None if bos is None else tid(bos), eos_id=tid(eos),
                     chat_template=template)


def _chats(name):
    return CHATS if name in ("mistral", "llama2-spaced-eos") else CHATS + [SYSTEM + CHATS[1]]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is the oracle")
@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("gen", [True, False])
def test_templates_render_as_transformers_renders_them(backend, name, gen):
    import transformers
    template, bos, eos, _ = TEMPLATES[name]
    ours = _tok(backend, name)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos,
                                                  eos_token=eos)
    theirs.chat_template = template
    for chat in _chats(name):
        for upto in range(1, len(chat) + 1):
            msgs = chat[:upto]
            if name == "mistral" and msgs[-1]["role"] == "assistant" and gen:
                continue
            assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == \
                theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_end_of_turn_is_read_off_the_template(backend, name):
    tok = _tok(backend, name)
    ids, text = tok.end_of_turn
    assert text == TEMPLATES[name][3] and ids == [backend.token_to_id(text)]


def test_without_a_template_chats_are_chatml(backend):
    tok = Tokenizer(backend, eos_id=backend.token_to_id("</s>"))
    assert tok.apply_chat_template(CHATS[0][:1]) == format_chatml(CHATS[0][:1])
    assert tok.end_of_turn == ([backend.token_to_id("<|im_end|>")], "<|im_end|>")


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_rows_mask_exactly_each_answer_and_its_end_of_turn(backend, name):
    tok = _tok(backend, name)
    eot = tok.end_of_turn[1]
    for chat in _chats(name):
        ids, mask = tokenize_example(tok, {"messages": chat})
        full = tok.apply_chat_template(chat, add_generation_prompt=False)
        text = tok.decode(ids, skip_special_tokens=False)
        # the row is the whole conversation up to the last answer's end-of-turn token
        assert full.startswith(text) and text.endswith(eot) and full[len(text):] in ("", "\n")
        if name != "llama2-spaced-eos":    # a space before the answer: a token of its own
            assert ids == tok.encode(text)      # pieces tokenized apart = the whole at once
        spans = masked_runs(ids, mask)
        answers = [m["content"] for m in chat if m["role"] == "assistant"]
        got = [tok.decode(s, skip_special_tokens=False) for s in spans]
        if name == "llama2-spaced-eos":    # the template writes " a </s>" for each answer a
            assert got == [a + " " + eot for a in answers]
        else:
            assert got == [a + eot for a in answers]


def test_a_template_that_raises_names_its_message(backend):
    tok = _tok(backend, "mistral")
    with pytest.raises(ValueError, match="Conversation roles must alternate"):
        tok.apply_chat_template(SYSTEM + CHATS[0])
    with pytest.raises(ValueError, match="could not render"):
        Tokenizer(backend, chat_template="{% for m in messages %}").apply_chat_template(CHATS[0])


def test_a_template_rewriting_answers_is_refused_by_name(backend):
    tok = _tok(backend, "llama3")      # trims every content: " no " renders as "no"
    chat = [dict(m) for m in CHATS[1]]
    chat[1]["content"] = " no "
    with pytest.raises(ValueError, match="rewrites assistant content"):
        tokenize_example(tok, {"messages": chat})
    chat[1]["content"] = "no"
    assert tokenize_example(tok, {"messages": chat})[0]


def test_answers_after_a_reasoning_block_train_the_answer_only(backend):
    """Qwen3 style: the last assistant turn is rendered after an empty think block, earlier
    ones without; the block is prompt, the answer and its end of turn are trained."""
    template = QWEN25.replace(
        "{{- '<|im_start|>' + message.role + '\\n' + message.content",
        "{{- '<|im_start|>' + message.role + '\\n' + ('<think>\\n\\n</think>\\n\\n' "
        "if message.role == 'assistant' and loop.last else '') + message.content")
    tok = Tokenizer(backend, eos_id=backend.token_to_id("<|im_end|>"), chat_template=template)
    ids, mask = tokenize_example(tok, {"messages": CHATS[1]})
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.count("<think>") == 1 and text.endswith("</think>\n\n" + CHATS[1][3]["content"]
                                                        + "<|im_end|>")
    answer = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(answer, skip_special_tokens=False) == "no<|im_end|>" + \
        CHATS[1][3]["content"] + "<|im_end|>"


def test_smollm2_template_renders_as_chatml_with_its_system_turn():
    """The embedded model's own template, rendered by Jinja, is the ChatML the main job was
    built on: every row it trains and scores is unchanged."""
    from lora_jax.models import smollm2
    tok = load_tokenizer(smollm2.default_model_path())
    system = tok.default_system_prompt
    assert system.startswith("You are a helpful AI assistant named SmolLM")
    for chat in CHATS + [SYSTEM + CHATS[1]]:
        for upto in range(1, len(chat) + 1):
            for gen in (True, False):
                assert tok.apply_chat_template(chat[:upto], add_generation_prompt=gen) == \
                    format_chatml(chat[:upto], add_generation_prompt=gen, default_system=system)
    assert tok.end_of_turn == ([tok.token_to_id("<|im_end|>")], "<|im_end|>")


def test_a_tokenizer_that_adds_bos_puts_it_once_at_the_start(backend):
    """Llama-style tokenizers add BOS to what they encode: only a row's start gets one, not
    each answer, and the prompt the scorer and generation use ends where the answer begins."""
    from lora_jax.recipes.finetune.data import chat_prefix
    from lora_jax.recipes.finetune.evaluate import answer_prompt
    bos = backend.token_to_id("<s>")
    tok = Tokenizer(backend, bos_id=bos, eos_id=backend.token_to_id("</s>"),
                    chat_template=MISTRAL, add_bos=True)
    for example in ({"messages": CHATS[1]}, {"prompt": "good film?", "completion": "no"}):
        ids, mask = tokenize_example(tok, example)
        assert ids[0] == bos and ids.count(bos) == 1
    ex = {"prompt": "good film?", "completion": "no"}
    assert answer_prompt(tok, ex) == chat_prefix(tok, "good film?")
    chat = {"messages": CHATS[1], "completion": CHATS[1][-1]["content"]}
    ids, _ = tokenize_example(tok, chat, add_end=False)
    assert ids == answer_prompt(tok, chat) + tok.encode(chat["completion"], add_bos=False)
