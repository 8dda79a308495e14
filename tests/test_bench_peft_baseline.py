"""experiments/peft_baseline.py: both arms' reduced run, and the pieces that make them match."""

from __future__ import annotations

import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import peft_baseline as pb
from lora_jax.recipes.finetune import DEFAULT_TARGETS, FinetuneConfig


def test_full_rows_puts_labels_where_the_recipe_puts_loss():
    prefix = np.array([7, 8], np.int32)
    ids = np.array([[9, 4, 5, 2, 2], [3, 6, 2, 2, 2]], np.int32)
    mask = np.array([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.float32)  # logits at t -> t + 1
    full, labels, attn = pb.full_rows(prefix, ids, mask)
    assert full.tolist() == [[7, 8, 9, 4, 5, 2, 2], [7, 8, 3, 6, 2, 2, 2]]
    x = -100
    assert labels.tolist() == [[x, x, x, x, 5, 2, x], [x, x, x, 6, 2, x, x]]
    # the pad is the end-of-turn token: each row ends after its last answer token
    assert attn.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]]


def test_peft_targets_are_the_recipe_targets():
    names = pb.peft_targets()
    assert sorted(names) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                    "up_proj", "down_proj"])
    group = {"q_proj": "self_attn", "gate_proj": "mlp", "down_proj": "mlp"}
    for n, g in group.items():
        assert re.search(DEFAULT_TARGETS, f"layers/{g}/{n}/kernel")
    assert pb.peft_targets(r"layers/mlp/down_proj/kernel") == ["down_proj"]


def _recipe_lrs(cfg: FinetuneConfig) -> list[float]:
    """The learning rate of each of the recipe's steps, read off its optimizer: with a
    constant unit gradient Adam's normalized update is 1 / (1 + eps), so -update = lr
    (to float32 rounding of the bias corrections, ~2e-5)."""
    from lora_jax.recipes.finetune.train import _optimizer
    tx = _optimizer(cfg)
    w, g = {"w": jnp.zeros((), jnp.float32)}, {"w": jnp.ones((), jnp.float32)}
    with jax.numpy_dtype_promotion("standard"):
        state = tx.init(w)
        update = jax.jit(tx.update)
        out = []
        for _ in range(cfg.steps):
            u, state = update(g, state, w)
            out.append(-float(u["w"]) * (1 + 1e-8))
    return out


@pytest.mark.parametrize("steps", [2, 7, 100])
def test_peft_schedule_is_the_recipe_schedule(steps):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    cfg = FinetuneConfig(steps=steps)
    opt, sched = pb.peft_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))])
    ours = []
    for _ in range(steps):
        ours.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    np.testing.assert_allclose(ours, _recipe_lrs(cfg), rtol=1e-4, atol=1e-10)
    assert ours[0] == 0.0 and max(ours) == pytest.approx(cfg.lr)
    if steps == 100:
        assert ours[10] == pytest.approx(cfg.lr) and ours[-1] > pb.MIN_LR_RATE * cfg.lr


def test_summarize_arm_reads_the_first_evaluation_over_the_threshold():
    cfg = FinetuneConfig(steps=20, eval_every=10)
    ev = [{"step": 0, "accuracy": 0.5, "train_seconds": 0.0, "eval_seconds": 3.0},
          {"step": 10, "accuracy": 0.8, "train_seconds": 30.0, "eval_seconds": 2.0},
          {"step": 20, "accuracy": 0.79, "train_seconds": 55.0, "eval_seconds": 2.0}]
    s = pb.summarize_arm(cfg, {"evals": ev, "first_step_seconds": 17.0})
    assert s["train_seconds_to_0.80"] == 30.0 and s["step_reaching_0.80"] == 10
    assert s["final_accuracy"] == 0.79 and s["initial_accuracy"] == 0.5
    assert s["seconds_per_step"] == 55.0 / 20
    assert s["seconds_per_step_after_first"] == (55.0 - 17.0) / 19
    assert s["eval_seconds_total"] == 7.0
    never = pb.summarize_arm(cfg, {"evals": ev[:1] + [dict(ev[2])], "first_step_seconds": 1.0})
    assert never["train_seconds_to_0.80"] is None and never["step_reaching_0.80"] is None
    assert pb.eval_steps(cfg) == [0, 10, 20]
    assert pb.eval_steps(FinetuneConfig(steps=25, eval_every=10)) == [0, 10, 20, 25]
    assert pb.eval_steps(FinetuneConfig(steps=3)) == [0, 3]


@pytest.mark.parametrize("spec", ["ours,lora", "", "ours,ours"])
def test_bad_arms_are_named(spec):
    with pytest.raises(ValueError, match=r"^--arms must list some of ours, peft"):
        pb._arms(spec)


def test_reduced_run_both_arms_match(tmp_path, monkeypatch):
    for mod in ("torch", "transformers", "peft", "bitsandbytes"):
        pytest.importorskip(mod)
    # the arms run in fresh processes: give them the machine's real devices, not the
    # 8 simulated ones this test session uses
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   __import__("os").environ.get("XLA_FLAGS", "")).strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    out = tmp_path / "peft_baseline.json"
    assert pb.main(["--steps", "2", "--eval-every", "1", "--eval-size", "4", "--batch", "2",
                    "--torch-threads", "1", "--out", str(out)]) == 0
    text = out.read_text()
    assert not any(p in text for p in ("/tmp", "/root", "/work", "/home"))
    r = json.loads(text)
    assert set(r["arms"]) == {"ours", "peft"}
    for arm in r["arms"].values():
        assert [e["step"] for e in arm["evals"]] == [0, 1, 2]
        for e in arm["evals"]:
            assert 0.0 <= e["accuracy"] <= 1.0 and math.isfinite(e["train_seconds"])
        assert arm["evals"][0]["train_seconds"] == 0.0
        assert 0 < arm["evals"][1]["train_seconds"] < arm["evals"][2]["train_seconds"]
        assert len(arm["losses"]) == 2 and all(math.isfinite(x) for x in arm["losses"])
        assert arm["heldout_examples"] == 4 and arm["versions"]["python"]
    ours, peft = r["arms"]["ours"], r["arms"]["peft"]
    assert peft["base"] == "nf4 (bitsandbytes)", peft["base"]
    assert ours["trainable_params"] == peft["trainable_params"] == 2_442_240
    assert ours["heldout_digest"] == peft["heldout_digest"]
    assert ours["step0_digest"] == peft["step0_digest"]
    assert ours["shared_prefix_tokens"] == peft["shared_prefix_tokens"] > 0
    c = r["checks"]
    assert c["same_heldout_examples"] and c["same_step0_batch"]
    # both score the same NF4 codes; the double-quantized block scales differ by float
    # rounding (a few by one 8-bit step, tests/quant), which blocks depends on the machine's
    # float arithmetic, so per-answer log-likelihoods differ by up to ~0.2 nats (the README
    # run: 0.17 max over 300 examples; this reduced run has read both below 0.05 and 0.13).
    # A wrong weight or layout moves them by whole nats and flips predictions.
    assert c["initial_loglik_max_abs_diff"] < 0.25, c
    assert c["initial_predictions_agree"] == 4 and c["initial_accuracy_diff"] == 0.0
    # the same first batch and the same weights: the step-1 losses agree closely
    assert abs(ours["losses"][0] - peft["losses"][0]) < 0.01 * ours["losses"][0]
    assert peft["lrs"] == [0.0, pytest.approx(FinetuneConfig.lr)]
