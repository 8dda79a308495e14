"""A finetune run as a tool: resume, signals, never clobbering, meshes, data formats."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lora_jax as lj
from helpers import masked_runs
from lora_jax import cli
from lora_jax.models import format_chatml, load_tokenizer
from lora_jax.recipes.finetune import (
    FinetuneConfig,
    Scorer,
    adapt,
    check_config,
    finetune,
    generate_text,
    load_base,
    load_run,
    make_logits_at,
    read_run_config,
    write_run_config,
)
from lora_jax.recipes.finetune import data as D
from lora_jax.recipes.finetune import sources as S
from lora_jax.recipes.finetune.evaluate import heldout_split

REPO = Path(__file__).resolve().parents[2]


def _cfg(setup, out, **kw) -> FinetuneConfig:
    model_dir, data, _ = setup
    base = dict(model=str(model_dir), data=str(data), rank=2, alpha=4.0, batch=4, seq_len=40,
                eval_size=8, lr=1e-2, steps=6, progress=False, plot=False, out=str(out))
    return FinetuneConfig(**{**base, **kw})


def _quiet(*_):
    pass


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(setup):
    """An uninterrupted 6-step QLoRA run checkpointing every 3 steps."""
    out = setup[2] / "uninterrupted"
    return out, finetune(_cfg(setup, out, save_every=3), log=_quiet)


def test_resume_equals_an_uninterrupted_run(setup, finished):
    out, full = finished
    assert lj.adapter_steps(out / "adapter") == [3, 6]
    # The same run killed after its step-3 checkpoint: only that checkpoint survives.
    cut = setup[2] / "killed"
    shutil.copytree(out, cut)
    for name in ("adapter/6", "peft", "summary.json"):
        shutil.rmtree(cut / name) if (cut / name).is_dir() else (cut / name).unlink()
    resumed = finetune(_cfg(setup, cut, save_every=3, resume=True), log=_quiet)
    assert resumed["losses"] == full["losses"]            # bit for bit
    assert len(full["losses"]) == 6 and full["accuracy_after"] == resumed["accuracy_after"]
    # the final checkpoints' arrays (adapter and optimizer state) hash the same, byte for byte
    meta, ref = (lj.read_adapter_metadata(d / "adapter") for d in (cut, out))
    assert meta["arrays"] == ref["arrays"] and meta["step"] == 6
    user = meta["user"]
    assert user["step"] == 6 and user["position"] == 6 * 4 and user["losses"] == full["losses"]


def test_resume_refuses_changed_settings_and_a_finished_run(setup, finished):
    out, _ = finished
    with pytest.raises(ValueError, match=r"settings differ.*lr=0\.5"):
        finetune(_cfg(setup, out, save_every=3, resume=True, lr=0.5), log=_quiet)
    with pytest.raises(ValueError, match="is complete"):
        finetune(_cfg(setup, out, save_every=3, resume=True), log=_quiet)


def test_a_second_run_into_the_same_out_is_refused_and_loses_nothing(setup, finished, capsys):
    out, _ = finished
    (out / "notes.txt").write_text("mine")
    before = _snapshot(out)
    model_dir, data, _ = setup
    args = ["finetune", "--model", str(model_dir), "--data", str(data), "--out", str(out),
            "--no-progress"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a previous run" in err and "--overwrite" in err
    assert "Traceback" not in err
    assert cli.main(args + ["--steps", "-3", "--overwrite"]) == 2     # validated first
    assert "--steps must be an integer >= 1, got -3" in capsys.readouterr().err
    assert _snapshot(out) == before
    (out / "notes.txt").unlink()


def test_overwrite_replaces_only_the_run_outputs(setup):
    out = setup[2] / "project"
    out.mkdir()
    (out / "train.py").write_text("print('my code')")
    with pytest.raises(ValueError, match="already holds other files"):
        finetune(_cfg(setup, out, steps=2), log=_quiet)
    s = finetune(_cfg(setup, out, steps=2, overwrite=True, eval_size=0), log=_quiet)
    assert (out / "train.py").read_text() == "print('my code')"
    assert s["accuracy_after"] is None and len(s["losses"]) == 2
    assert lj.adapter_steps(out / "adapter") == [2]


def test_eight_devices_give_the_one_device_loss(setup):
    tmp = setup[2]
    one = finetune(_cfg(setup, tmp / "mesh1", mesh="fsdp=1", batch=8, steps=3, eval_size=0,
                        save=False), log=_quiet)
    eight = finetune(_cfg(setup, tmp / "mesh8", mesh="data=2,fsdp=4", batch=8, steps=3,
                          eval_size=0, save=False), log=_quiet)
    assert one["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    assert eight["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
    with pytest.raises(ValueError, match="--batch 6 does not split"):
        finetune(_cfg(setup, tmp / "mesh-bad", mesh="fsdp=4", batch=6), log=_quiet)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_and_exits_cleanly(setup, sig):
    model_dir, data, tmp = setup
    out = tmp / f"signal-{sig.name}"
    cmd = [sys.executable, "-m", "lora_jax.cli", "finetune", "--model", str(model_dir),
           "--data", str(data), "--rank", "2", "--batch", "4", "--seq-len", "40",
           "--eval-size", "0", "--steps", "100000", "--out", str(out), "--no-progress"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=REPO)
    for line in p.stdout:                  # the handlers are installed when this is printed
        if line.startswith("training: "):
            break
    p.send_signal(sig)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert f"stopped by {sig.name} at step" in err and "--resume" in err
    (step,) = lj.adapter_steps(out / "adapter")
    assert step >= 1
    meta = lj.read_adapter_metadata(out / "adapter")["user"]
    assert len(meta["losses"]) == step and meta["position"] == 4 * step


# ------------------------------------------------------------------------ data formats
CHAT = [{"messages": [{"role": "user", "content": "the plot was awful"},
                      {"role": "assistant", "content": "negative"},
                      {"role": "user", "content": "and the acting?"},
                      {"role": "assistant", "content": "very good"}]},
        {"messages": [{"role": "system", "content": "be brief"},
                      {"role": "user", "content": "the film was superb"},
                      {"role": "assistant", "content": "positive"}]}]


def test_chat_rows_carry_loss_on_assistant_turns_only(setup):
    tok = load_tokenizer(setup[0])
    end = tok.token_to_id("<|im_end|>")
    for ex in CHAT:
        ids, mask = D.tokenize_example(tok, ex)
        text = format_chatml(ex["messages"], add_generation_prompt=False,
                             default_system=tok.default_system_prompt)
        assert ids == tok.encode(text.rstrip("\n"))     # the whole conversation, templated
        answers = [m["content"] for m in ex["messages"] if m["role"] == "assistant"]
        runs = masked_runs(ids, mask)
        assert [tok.decode(r) for r in runs] == answers
        assert all(r[-1] == end for r in runs)
    enc = D.encode_rows(D.tokenize_examples(tok, CHAT), 64)
    tgt = [[int(enc.ids[i, t + 1]) for t in np.nonzero(enc.loss_mask[i])[0]] for i in range(2)]
    assert tgt == [r for r in (D.tokenize_example(tok, ex) for ex in CHAT)
                   for r in [[t for t, m in zip(*r) if m]]]


def test_chat_jsonl_and_csv_train(setup):
    tmp = setup[2]
    rng = np.random.default_rng(1)
    rows = []
    for i in range(24):
        good = i % 2 == 0
        words = " ".join(rng.choice(["good", "great"] if good else ["bad", "dull"], 2))
        rows.append({"messages": [{"role": "user", "content": f"the film was {words} {i}"},
                                  {"role": "assistant", "content": "yes" if good else "no"}]})
    chat = tmp / "chat.jsonl"
    chat.write_text("\n".join(json.dumps(r) for r in rows))
    s = finetune(_cfg(setup, tmp / "chat-run", data=str(chat), steps=2, eval_size=6,
                      eval_every=1), log=_quiet)
    assert s["unique_examples"] == 24 and len(s["losses"]) == 2
    assert [e["step"] for e in s["evals"]] == [1]
    csv = tmp / "data.csv"
    csv.write_text('prompt,completion\n"a, quoted ""prompt""",yes\nplain,no\n')
    assert S.load_csv(csv) == [{"prompt": 'a, quoted "prompt"', "completion": "yes"},
                               {"prompt": "plain", "completion": "no"}]


@pytest.mark.parametrize("name,content,match", [
    ("null.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": null}',
     r"null.jsonl:2: 'completion' must be a string, got null"),
    ("bad.jsonl", '{"prompt": "a", "completion": "b"}\nnot json', r"bad.jsonl:2: not valid JSON"),
    ("bin.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}',
     r"bin.jsonl:2: not UTF-8"),
    ("roles.jsonl", '{"messages": [{"role": "bot", "content": "x"}]}',
     r"roles.jsonl:1: messages\[0\]"),
    ("last.jsonl", '{"messages": [{"role": "user", "content": "x"}]}',
     r"last.jsonl:1: the last message must be the assistant's"),
    ("cols.csv", "question,answer\na,b\n", r"cols.csv:1: the header must name"),
    ("empty.jsonl", "\n\n", r"empty.jsonl holds no examples"),
])
def test_bad_data_names_the_file_and_line(tmp_path, name, content, match):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=match):
        S.load_examples(str(f), 0)


def test_bad_flags_exit_2_with_one_line(setup, capsys):
    model_dir, data, tmp = setup
    for flags, msg in [(["--batch", "0"], "--batch must be an integer >= 1, got 0"),
                       (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
                       (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
                       (["--targets", "("], "--targets is not a valid regular expression"),
                       (["--mesh", "gpu=2"], "--mesh must look like"),
                       (["--data", str(tmp / "missing.jsonl")], "no such file"),
                       (["--resume"], "holds no run to resume")]:
        out = tmp / "never"
        rc = cli.main(["finetune", "--model", str(model_dir), "--data", str(data),
                       "--out", str(out), "--no-progress", *flags])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "Traceback" not in err, (flags, err)
        assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_debug_shows_the_traceback(setup):
    with pytest.raises(ValueError, match="--batch"):
        cli.main(["--debug", "finetune", "--batch", "0", "--out", str(setup[2] / "never")])


def test_config_round_trips_through_run_json(tmp_path):
    cfg = dataclasses.replace(FinetuneConfig(), rank=3, mesh="fsdp=2", out=str(tmp_path))
    write_run_config(cfg, tmp_path)
    assert read_run_config(tmp_path) == cfg


def test_generate_answers_the_heldout_prompts_as_the_scorer_says(setup, learnable_base):
    """After real training, greedy generation answers each held-out prompt with a whole class,
    the one whose first token the scorer's own log-probabilities rank first, and that is the
    class the log-likelihood scorer picks wherever first token and whole answer agree."""
    root = learnable_base.parent
    cfg = _cfg((learnable_base, setup[1], root), root / "trained", steps=100, batch=8, lr=2e-2,
               warmup=5, rank=8, alpha=16.0, quant="none")
    summary = finetune(cfg, log=_quiet)
    out = root / "trained"
    run = load_run(out)
    _, _, held = heldout_split(run.config)
    f = lj.lora(make_logits_at(run.model))
    scorer = Scorer(run.tokenizer, held, run.config.seq_len,
                    lambda p, i, q: jax.nn.log_softmax(f(p, i, q), axis=-1), 4)
    scores = scorer.scores(run.params)                       # [N, 2] answer log-likelihoods
    answers = [generate_text(run, e["prompt"], max_new_tokens=12)[0].strip() for e in held]
    # Greedy decoding commits to the likelier first token, and then completes that answer;
    # the scorer sums every token of each answer ("negative" is 2 tokens here, "positive" 3),
    # so the two disagree where the first token and the whole answer rank differently.
    first = scorer._logp(run.params, 0)[:, 0, :]            # [N, V] at the answer's start
    first = np.stack([first[:, toks[0]] for toks in scorer.cand], 1)
    assert [scorer.classes[c] for c in first.argmax(1)] == answers
    agree = first.argmax(1) == scores.argmax(1)
    assert agree.mean() >= 0.8, agree
    picked = [scorer.classes[c] for c in scores.argmax(1)]
    assert [a for a, ok in zip(answers, agree) if ok] == [p for p, ok in zip(picked, agree) if ok]
    gold = [e["completion"] for e in held]
    assert float(np.mean([p == g for p, g in zip(picked, gold)])) == summary["accuracy_after"]
    assert float(np.mean([a == g for a, g in zip(answers, gold)])) >= 0.75
    assert summary["accuracy_after"] >= 0.75


def test_loftq_init_starts_closer_to_the_base_and_trains(setup):
    cfg = _cfg(setup, setup[2] / "loftq", init="loftq")
    params = load_base(cfg).params
    err = lambda cfg: sum(float(np.sum((np.asarray(w) - np.asarray(m)) ** 2))
                          for w, m in zip(jax.tree.leaves(params),
                                          jax.tree.leaves(lj.merge(adapt(cfg, params)))))
    plain = dataclasses.replace(cfg, init="default")
    assert err(cfg) < 0.8 * err(plain)       # deq(Q) + s*A@B vs deq(Q) alone
    s = finetune(cfg, log=_quiet)
    assert np.isfinite(s["losses"]).all() and read_run_config(cfg.out).init == "loftq"
    with pytest.raises(ValueError, match="--init loftq .* needs --quant"):
        check_config(dataclasses.replace(cfg, quant="none"))
