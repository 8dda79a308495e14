"""``lora-jax finetune`` end to end on a tiny random Llama written as an HF checkpoint dir."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax import cli
from lora_jax.models import from_pretrained, load_tokenizer
from lora_jax.recipes.finetune import DEFAULT_TARGETS, answer_positions, make_logits_at
from lora_jax.recipes.finetune import data as D
from lora_jax.recipes.finetune import sources as S


@pytest.mark.parametrize("quant", ["nf4", "none"])
def test_finetune_end_to_end(setup, quant, capsys):
    model_dir, data, tmp = setup
    out = tmp / f"run-{quant}"
    rc = cli.main(["finetune", "--model", str(model_dir), "--data", str(data), "--quant", quant,
                   "--rank", "2", "--alpha", "4", "--steps", "3", "--batch", "4",
                   "--seq-len", "40", "--eval-size", "8", "--lr", "1e-2", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    for k in ("accuracy_before", "accuracy_after"):
        assert 0.0 <= s[k] <= 1.0
    assert s["heldout_examples"] == 8 and s["unique_examples"] == 48   # the duplicate is dropped
    assert s["config"]["quant"] == quant and len(s["losses"]) == 3
    assert all(np.isfinite(s["losses"]))
    # L * r * (q, o: 24+24; k, v: 24+12; gate, up, down: 24+40)
    assert s["trainable_params"] == 2 * 2 * (2 * 48 + 2 * 36 + 3 * 64)
    assert s["optimizer_state_bytes"] < s["full_ft_optimizer_state_bytes"]
    if quant == "nf4":
        assert s["base_stored_bytes"] < s["base_fp32_bytes"]
    if importlib.util.find_spec("matplotlib") is not None:   # an experiments extra
        assert (out / "loss.png").stat().st_size > 1000
    assert (out / "peft" / "adapter_model.safetensors").exists()
    cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 4
    assert (out / "adapter" / "3").is_dir()
    printed = capsys.readouterr().out
    assert "trainable parameters" in printed and "held-out accuracy" in printed

    # the saved adapter restores onto the same (quantized) base
    _, base = from_pretrained(model_dir)
    if quant != "none":
        base = lj.quantize(base, quant, targets=DEFAULT_TARGETS)
    template = lj.lorafy(base, rank=2, alpha=4, targets=DEFAULT_TARGETS)
    restored = lj.restore_adapter(out / "adapter", template)
    is_lora = lambda x: isinstance(x, lj.LoraWeight)
    trained_b = [x.b for x in jax.tree.leaves(restored, is_leaf=is_lora) if is_lora(x)]
    assert any(float(jnp.abs(b).max()) > 0 for b in trained_b)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_finetune_and_export_a_qwen_model(family_setup, tmp_path, model_type, capsys):
    """Another architecture of the family through the CLI: trained, exported under its own
    model_type, and the merged export computes the run's logits."""
    model_dir, data = family_setup(model_type)
    run = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(model_dir), "--data", str(data), "--quant",
                     "none", "--rank", "2", "--alpha", "4", "--steps", "2", "--batch", "4",
                     "--seq-len", "40", "--eval-size", "8", "--lr", "1e-2", "--out", str(run),
                     "--no-progress"]) == 0
    merged = tmp_path / "merged"
    assert cli.main(["export", str(run), "--merged", str(merged)]) == 0
    capsys.readouterr()
    hf = json.loads((merged / "config.json").read_text())
    assert hf["model_type"] == model_type
    model, base = from_pretrained(model_dir)
    attn = base["layers"]["self_attn"]
    assert ("bias" in attn["q_proj"], "q_norm" in attn) == (model_type == "qwen2",
                                                            model_type == "qwen3")
    trained = lj.restore_adapter(run / "adapter", lj.lorafy(base, rank=2, alpha=4,
                                                            targets=DEFAULT_TARGETS))
    ids = jnp.asarray([[5, 9, 17, 3, 40, 41]], jnp.int32)
    m_model, m_params = from_pretrained(merged)
    assert m_model.config == model.config
    np.testing.assert_allclose(m_model.apply({"params": m_params}, ids),
                               lj.lora(model.apply)({"params": trained}, ids), atol=1e-5)


def test_finetune_chats_with_a_llama3_template(family_setup, tmp_path, capsys):
    """A model whose chat template is not ChatML (Llama 3's headers and <|eot_id|>): chat rows
    train on the answers and their <|eot_id|>, and the run generates and stops there."""
    model_dir, data = family_setup(template="llama3")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "answer with one word"},
        {"role": "user", "content": r["prompt"]},
        {"role": "assistant", "content": r["completion"]}]}) + "\n" for r in rows))
    tok = load_tokenizer(model_dir)
    eot = tok.token_to_id("<|eot_id|>")
    ids, mask = D.tokenize_example(tok, json.loads(chats.read_text().splitlines()[0]))
    assert ids[0] == tok.bos_id and ids[-1] == eot and ids.count(eot) == 3
    assert tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False) == \
        "positive<|eot_id|>"
    run = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(model_dir), "--data", str(chats), "--quant",
                     "none", "--rank", "2", "--alpha", "4", "--steps", "2", "--batch", "4",
                     "--seq-len", "48", "--eval-size", "8", "--lr", "1e-2", "--out", str(run),
                     "--no-progress"]) == 0
    s = json.loads((run / "summary.json").read_text())
    assert 0.0 <= s["accuracy_after"] <= 1.0 and all(np.isfinite(s["losses"]))
    assert cli.main(["generate", str(run), "the movie was good", "--max-new-tokens", "4"]) == 0
    assert "held-out accuracy" in capsys.readouterr().out

    # Llama 3's template trims answers: one written with a trailing space is named, not mangled
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chats.read_text().replace('"positive"}', '"positive "}', 1))
    assert cli.main(["finetune", "--model", str(model_dir), "--data", str(bad), "--steps", "1",
                     "--out", str(tmp_path / "bad-run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "rewrites assistant content" in err and "user turn starts 'the movie was" in err
    assert not (tmp_path / "bad-run" / "adapter").exists()


def test_shared_prefix_forward_matches_full_forward(setup):
    """The shared-prefix KV trick gives the same logits as running each whole row."""
    model_dir, data, _ = setup
    model, params = from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    items = D.tokenize_examples(tok, S.load_jsonl(data)[:3])
    p = D.common_prefix_len(D.prompt_ids(it) for it in items)
    assert p > 0
    enc = D.encode_rows(items, 40, prefix_len=p, pad_id=2)
    pos, _ = answer_positions(enc.loss_mask)
    full = np.concatenate([np.repeat(enc.prefix[None], 3, 0), enc.ids], 1)
    ref = np.take_along_axis(np.asarray(model.apply({"params": params}, full)),
                             (pos + p)[:, :, None], axis=1)
    lp = lj.lorafy(params, rank=2, targets=DEFAULT_TARGETS)
    got = jax.jit(lj.lora(make_logits_at(model, enc.prefix)))(lp, enc.ids, pos)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_full_finetune_needs_an_unquantized_base(setup, capsys):
    model_dir, data, tmp = setup
    assert cli.main(["finetune", "--model", str(model_dir), "--data", str(data), "--rank", "0",
                     "--seq-len", "40", "--eval-size", "8", "--out", str(tmp / "r0"),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-jax finetune: error: --rank 0") and "needs --quant none" in err
    assert "Traceback" not in err and not (tmp / "r0").exists()


def test_encode_rows_masks_answer_predictions_and_cuts_long_prompts_in_the_middle():
    items = [([1, 2, 3, 4], [7, 8]), ([1, 2, 5, 6, 9, 10, 11, 12, 13], [7])]
    items = [(p + a, [0] * len(p) + [1] * len(a)) for p, a in items]
    enc = D.encode_rows(items, 9, prefix_len=2, pad_id=0)
    assert enc.prefix.tolist() == [1, 2]
    # the logits at t predict token t+1: positions 1 and 2 predict the answer 7, 8
    assert enc.ids[0].tolist() == [3, 4, 7, 8, 0, 0, 0]
    assert enc.loss_mask[0].tolist() == [0, 1, 1, 0, 0, 0, 0]
    # 7 prompt tokens + 1 answer in 7 slots: token 10 (the middle) goes, head and tail stay
    assert enc.ids[1].tolist() == [5, 6, 9, 11, 12, 13, 7]
    assert enc.loss_mask[1].tolist() == [0, 0, 0, 0, 0, 1, 0]
    assert enc.truncated == 1
    with pytest.raises(ValueError, match="raise --seq-len"):
        D.encode_rows([([1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 0, 0, 1, 1, 1, 1, 1, 1])], 9,
                      prefix_len=2)


def test_split_is_seeded_balanced_and_disjoint():
    ex = [{"prompt": f"p{i}", "completion": "a" if i % 3 else "b"} for i in range(60)]
    tr, held = S.split_examples(ex, 10, seed=3)
    tr2, held2 = S.split_examples(ex, 10, seed=3)
    assert held == held2 and tr == tr2
    assert sorted(e["completion"] for e in held) == ["a"] * 5 + ["b"] * 5
    assert not {e["prompt"] for e in tr} & {e["prompt"] for e in held}
    assert len(tr) + len(held) == 60


def test_help():
    res = subprocess.run([sys.executable, "-m", "lora_jax.cli", "finetune", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for flag in ("--model", "--data", "--rank", "--alpha", "--targets", "--quant", "--steps",
                 "--lr", "--batch", "--seq-len", "--eval-size", "--out", "--seed"):
        assert flag in res.stdout
