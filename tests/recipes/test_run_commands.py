"""``lora-jax generate / export / eval`` on finished runs built by hand: a tiny random Llama as
an HF dir, its run.json, and a random adapter (or full fine-tuned weights) where training
would have saved them."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from helpers import SMALL_LLAMA, bpe_tokenizer, close, randomize_b
from lora_jax import cli
from lora_jax.models import LlamaConfig, LlamaForCausalLM, generate, generate_batch
from lora_jax.models.decoding import _top_p
from lora_jax.recipes.finetune import (
    FinetuneConfig,
    Scorer,
    TextStream,
    adapt,
    evaluate_run,
    exact_match,
    export_run,
    generate_text,
    heldout_loss,
    load_base,
    load_run,
    make_logits_at,
    read_run_config,
    write_run_config,
)
from lora_jax.recipes.finetune.data import chat_prefix, encode_examples
from lora_jax.recipes.finetune.evaluate import heldout_split, shared_prefix_len
from lora_jax.recipes.finetune.generate import stop_ids
from lora_jax.recipes.finetune.sources import load_examples, load_jsonl

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPT = "is the plot good?"


def _write_tokenizer(d):
    """Byte-level BPE whose merges cover English words only: é, 日 and 🎉 stay 2-4 byte tokens."""
    text = "the plot was good bad fine dull user assistant system answer is yes no"
    tk = bpe_tokenizer([text] * 3, SPECIAL, 330)
    tk.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return tk.get_vocab_size()


def _base_dir(root):
    d = root / "base"
    d.mkdir()
    vocab = _write_tokenizer(d)
    cfg = LlamaConfig(**{**SMALL_LLAMA, "vocab_size": vocab}, num_key_value_heads=1,
                      eos_token_id=SPECIAL.index("<|im_end|>"))
    # Large weights: decisive logits, so greedy choices are no near-ties.
    params = jax.tree.map(lambda x: x * 40.0, LlamaForCausalLM(cfg).init_params(jax.random.key(1)))
    tmp = root / "base-weights"
    lj.export_merged(params, tmp)
    (tmp / "model.safetensors").rename(d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg.to_hf()))
    return d


def _data(root):
    words = ["good", "bad", "fine", "dull", "plot", "was"]
    rng = np.random.default_rng(0)
    cls, open_ = [], []
    for i in range(24):
        w = " ".join(rng.choice(words, 3))
        cls.append({"prompt": f"{w} {i}", "completion": "yes" if i % 2 else "no"})
        open_.append({"prompt": f"{w} {i}", "completion": f"answer {i} {w}"})
    paths = root / "cls.jsonl", root / "open.jsonl"
    for path, rows in zip(paths, (cls, open_)):
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return paths


def _lora_run(out, cfg):
    out.mkdir()
    write_run_config(cfg, out)
    fresh = load_run(out, adapter=False).params          # the training template, B = 0
    lj.save_adapter(out / "adapter", randomize_b(fresh, jax.random.key(7), scale=2.0), step=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    base, (cls, open_) = _base_dir(root), _data(root)
    cfg = FinetuneConfig(model=str(base), data=str(cls), rank=2, alpha=4.0, quant="none",
                         seq_len=40, eval_size=8, eval_batch=3, out=str(root / "lora"))
    _lora_run(root / "lora", cfg)
    ft = dataclasses.replace(cfg, rank=0, quant="none", out=str(root / "full"))
    (root / "full").mkdir()
    write_run_config(ft, root / "full")
    trained = jax.tree.map(lambda x: x * 1.1, load_base(ft).params)
    lj.export_merged(trained, root / "full" / "model")
    return {"root": root, "base": base, "lora": root / "lora", "full": root / "full",
            "open": open_, "full_params": trained}


@pytest.fixture(scope="module")
def lora(runs):
    return load_run(runs["lora"])


def _prompt_ids(run):
    return chat_prefix(run.tokenizer, PROMPT)


def _new_tokens(run, params, n=8, apply_fn=None):
    """``generate``'s greedy new tokens, cut after the first stop token."""
    ids, stops = _prompt_ids(run), stop_ids(run.tokenizer, run.model)
    out = np.asarray(generate(run.model, params, ids, n, eos_id=stops,
                              apply_fn=apply_fn or run.apply_fn))[len(ids):].tolist()
    ends = [i for i, t in enumerate(out) if t in stops]
    return out[: ends[0] + 1] if ends else out


def _bs(params):
    is_lw = lambda x: isinstance(x, lj.LoraWeight)
    return [x.b for x in jax.tree.leaves(params, is_leaf=is_lw) if is_lw(x)]


def test_streamed_generation_equals_generate_and_decode(lora):
    pieces = []
    text, tokens = generate_text(lora, PROMPT, max_new_tokens=8, on_text=pieces.append)
    assert tokens == _new_tokens(lora, lora.params)
    assert "".join(pieces) == text == lora.tokenizer.decode(tokens)
    # the restored adapter is the saved random one, not a fresh B = 0
    assert len(_bs(lora.params)) == 7 and all(float(jnp.abs(b).max()) > 0
                                               for b in _bs(lora.params))
    # nucleus sampling with a tiny top-p keeps only the top token: greedy
    _, nucleus = generate_text(lora, PROMPT, max_new_tokens=8, temperature=1.5, top_p=1e-6,
                               seed=5)
    assert nucleus == tokens


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]], jnp.float32))
    kept = lambda p: np.isfinite(np.asarray(_top_p(logits, p)))[0].tolist()
    # cumulative mass before each token, most likely first: 0, .5, .8, .95
    assert kept(0.5) == [False, True, False, False]
    assert kept(0.7) == [False, True, False, True]
    assert kept(0.85) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]


def test_no_adapter_is_the_base(runs, lora):
    run = load_run(runs["lora"], adapter=False)
    assert all(float(jnp.abs(b).max()) == 0 for b in _bs(run.params))
    _, tokens = generate_text(run, PROMPT, max_new_tokens=8)
    base = load_base(run.config)
    assert tokens == _new_tokens(run, base.params, apply_fn=base.model.apply)


def test_qlora_run_restores_onto_the_quantized_base(runs, tmp_path):
    cfg = dataclasses.replace(read_run_config(runs["lora"]),
                              quant="nf4", out=str(tmp_path / "q"))
    _lora_run(tmp_path / "q", cfg)
    qbase = jax.jit(lambda p: lj.quantize(p, "nf4", targets=cfg.targets))(
        load_base(cfg).params)
    run = load_run(tmp_path / "q")
    is_lw = lambda x: isinstance(x, lj.LoraWeight)
    lw = [x for x in jax.tree.leaves(run.params, is_leaf=is_lw) if is_lw(x)]
    q = [x for x in jax.tree.leaves(qbase, is_leaf=lambda x: isinstance(x, lj.QuantizedWeight))
         if isinstance(x, lj.QuantizedWeight)]
    assert len(lw) == len(q) == 7 and run.implicit
    for a, b in zip(lw, q):      # the adapter sits on the quantized base, codes bit-equal
        assert isinstance(a.w0, lj.QuantizedWeight) and float(jnp.abs(a.b).max()) > 0
        for x, y in zip(jax.tree.leaves(a.w0), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_full_finetune_run_loads_its_model_and_base(runs):
    run = load_run(runs["full"])
    assert not run.implicit
    for a, b in zip(jax.tree.leaves(run.params), jax.tree.leaves(runs["full_params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    base = load_run(runs["full"], adapter=False)
    for a, b in zip(jax.tree.leaves(base.params), jax.tree.leaves(load_base(run.config).params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_text_stream_holds_back_partial_utf8(lora):
    tok = lora.tokenizer
    text = "good é 日本 🎉 plot"
    ids = tok.encode(text)
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert "" in pieces[:-1] and not any("\ufffd" in p for p in pieces)


def test_generate_batch_equals_one_by_one(lora):
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 300, n).tolist() for n in (7, 11, 7)]
    got = generate_batch(lora.model, lora.params, prompts, 6, batch_size=2,
                         apply_fn=lora.apply_fn)
    for p, g in zip(prompts, got):
        ref = generate(lora.model, lora.params, p, 6, apply_fn=lora.apply_fn)
        assert g == np.asarray(ref)[len(p):].tolist()


def test_cli_generate_streams_to_stdout(runs, lora, capsys):
    assert cli.main(["generate", str(runs["lora"]), PROMPT, "--max-new-tokens", "8"]) == 0
    _, tokens = generate_text(lora, PROMPT, max_new_tokens=8)
    assert capsys.readouterr().out == lora.tokenizer.decode(tokens) + "\n"


@pytest.mark.parametrize("argv, msg", [
    (["--top-p", "0.5"], "--top-p 0.5 samples, but --temperature is 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
])
def test_cli_generate_bad_flags(runs, capsys, argv, msg):
    assert cli.main(["generate", str(runs["lora"]), PROMPT, *argv]) == 2
    assert f"lora-jax generate: error: {msg}" in capsys.readouterr().err


def test_not_a_run_and_missing_adapter(runs, tmp_path, capsys):
    with pytest.raises(ValueError, match="is not a lora-jax finetune run"):
        load_run(runs["base"])
    assert cli.main(["generate", str(tmp_path / "nope"), PROMPT]) == 2
    assert "no such directory" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run.json").write_text((runs["lora"] / "run.json").read_text())
    with pytest.raises(ValueError, match="has no adapter/ checkpoint"):
        load_run(bare)


@pytest.fixture(scope="module")
def exported(runs):
    root = runs["root"]
    argv = ["export", str(runs["lora"]), "--merged", str(root / "merged"), "--peft",
            str(root / "peft")]
    assert cli.main(argv) == 0
    return root / "merged", root / "peft"


@pytest.fixture(scope="module")
def forward(lora):
    """The run's logits (LoRA over the NF4 base) for one token row."""
    f = jax.jit(lora.apply_fn)
    return lambda ids: f({"params": lora.params}, jnp.asarray(ids, jnp.int32))


def test_export_merged_reloads_with_tokenizer(lora, exported, forward):
    merged, _ = exported
    assert {"model.safetensors", "config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in merged.iterdir()}
    model, params = lj.models.from_pretrained(merged)
    ids = [_prompt_ids(lora)]
    close(model.apply({"params": params}, jnp.asarray(ids, jnp.int32)), forward(ids), 1e-5)
    assert lj.models.load_tokenizer(merged).encode("good é") == lora.tokenizer.encode("good é")


def test_export_merged_loads_in_transformers(lora, exported, forward):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    merged, _ = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged)
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    text = lora.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}])
    ids = tok(text)["input_ids"]
    assert ids == _prompt_ids(lora)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits.numpy()
    close(forward([ids]), ref, 1e-4)


def test_export_peft_round_trips(lora, exported):
    _, peft = exported
    template = adapt(lora.config, load_base(lora.config).params)   # fresh B = 0
    loaded = lj.from_peft(peft, template)
    is_lw = lambda x: isinstance(x, lj.LoraWeight)
    pairs = [(a, b) for a, b in zip(jax.tree.leaves(loaded, is_leaf=is_lw),
                                    jax.tree.leaves(lora.params, is_leaf=is_lw)) if is_lw(a)]
    assert len(pairs) == 7
    for a, b in pairs:
        close(a.a, b.a, 1e-6)
        close(a.b, b.b, 1e-6)


def test_export_refuses_to_replace_without_overwrite(runs, lora, capsys):
    out = runs["root"] / "user-dir"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert cli.main(["export", str(runs["lora"]), "--peft", str(out)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    export_run(lora, peft=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json",
                                                     "adapter_model.safetensors"]


@pytest.mark.parametrize("run, argv, msg", [
    ("full", ["--peft", "{root}/p"], "is a full fine-tuning run (rank 0); it has no LoRA"),
    ("lora", [], "export needs --peft DIR and/or --merged DIR"),
    ("lora", ["--merged", "{run}", "--overwrite"], "would replace the run's own files"),
    ("lora", ["--merged", "{run}/adapter", "--overwrite"], "would replace the run's own files"),
])
def test_export_errors(runs, capsys, run, argv, msg):
    argv = [a.format(root=runs["root"], run=runs[run]) for a in argv]
    assert cli.main(["export", str(runs[run]), *argv]) == 2
    assert msg in capsys.readouterr().err
    assert (runs["lora"] / "adapter").is_dir() and (runs["lora"] / "run.json").is_file()


def test_eval_classification_equals_scorer(runs, lora, capsys):
    res = evaluate_run(lora)
    cfg = lora.config
    _, _, _, held = load_examples(cfg.data, cfg.eval_size, seed=cfg.seed)
    f = lj.lora(make_logits_at(lora.model))      # no shared prefix: every row whole
    scorer = Scorer(lora.tokenizer, held, cfg.seq_len,
                    jax.jit(lambda p, i, q: jax.nn.log_softmax(f(p, i, q), axis=-1)), 4)
    ref = scorer(lora.params)
    assert res["task"] == "classification" and res["examples"] == 8 == len(held)
    assert res["accuracy"] == ref["accuracy"] and res["predicted"] == ref["predicted"]
    assert cli.main(["eval", str(runs["lora"]), "--eval-size", "9"]) == 2
    assert "--eval-size must be an integer in 1..8" in capsys.readouterr().err
    assert cli.main(["eval", str(runs["lora"]), "--eval-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "4 held-out examples (classification; run)" in out and "accuracy: " in out


def test_heldout_loss_is_the_mean_answer_nll(runs, lora, forward):
    exs = load_jsonl(runs["open"])[:5]
    enc = encode_examples(lora.tokenizer, exs, 40)
    got = heldout_loss(lj.lora(make_logits_at(lora.model)), lora.params, enc, batch=2)
    lp = np.asarray(jax.nn.log_softmax(forward(enc.ids), axis=-1))
    t, p = np.nonzero(enc.loss_mask)       # row t, position p predicts token p + 1
    np.testing.assert_allclose(got, -lp[t, p, enc.ids[t, p + 1]].mean(), rtol=1e-5)


def test_exact_match_counts_greedy_answers(runs, lora):
    exs = load_jsonl(runs["open"])[:4]
    kw = dict(apply_fn=lora.apply_fn)
    answers = generate_batch(lora.model, lora.params,
                             [chat_prefix(lora.tokenizer, e["prompt"]) for e in exs], 5,
                             eos_id=stop_ids(lora.tokenizer, lora.model), batch_size=3, **kw)
    own = [{**e, "completion": " " + lora.tokenizer.decode(a) + "\n"}
           for e, a in zip(exs, answers)]
    em = lambda xs: exact_match(lora.model, lora.params, lora.tokenizer, xs,
                                max_new_tokens=5, batch=3, **kw)
    assert em(own) == 1.0
    assert em(own[:2] + [{**e, "completion": "something else"} for e in own[2:]]) == 0.5


def test_eval_open_ended_reports_loss_and_exact_match(runs, lora):
    run = dataclasses.replace(lora, config=dataclasses.replace(lora.config,
                                                                data=str(runs["open"])))
    res = evaluate_run(run, eval_size=5)
    _, train, held = heldout_split(run.config, 5)
    assert res["task"] == "open-ended" and res["examples"] == len(held) == 5
    _, _, _, all_held = load_examples(str(runs["open"]), 8, seed=0)
    assert {e["prompt"] for e in held} <= {e["prompt"] for e in all_held}
    n = shared_prefix_len(run.tokenizer, train + held, 40)
    enc = encode_examples(run.tokenizer, held, 40, prefix_len=n)
    f = lj.lora(make_logits_at(run.model, enc.prefix))
    np.testing.assert_allclose(res["loss"], heldout_loss(f, run.params, enc), rtol=1e-5)
    assert res["accuracy"] == exact_match(run.model, run.params, run.tokenizer, held, batch=3,
                                          apply_fn=run.apply_fn)
