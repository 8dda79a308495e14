"""``experiments.bench`` with HF PEFT stepping in the same rotation: a tiny config, 3 rounds."""

import json
import statistics

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

from experiments import bench as B  # noqa: E402


def test_peft_steps_in_the_rounds_and_ratios_come_from_them(tmp_path, monkeypatch):
    monkeypatch.setitem(B.CONFIGS, "tiny", dict(
        vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    out = tmp_path / "b.json"
    rep = B.main(["--model", "tiny", "--batch", "2", "--seq", "11", "--reps", "3",
                  "--only", "step_ours", "--out", str(out)])
    assert json.loads(out.read_text())["peft"] == rep["peft"]
    peft = rep["peft"]
    assert "skipped" not in peft, peft
    assert len(peft["times_s"]) == 3 and all(t > 0 for t in peft["times_s"])
    assert peft["median_s"] == statistics.median(peft["times_s"])
    ours = rep["variants"]["step_ours"]["median_s"]
    assert rep["ratios"]["ours/HF PEFT grad-step wall"] == pytest.approx(ours / peft["median_s"])
    # round r timed both while the machine was the same: the ratio pairs them up
    ours_times = rep["variants"]["step_ours"]["times_s"]
    assert rep["ratios"]["ours/HF PEFT grad-step wall, median of rounds"] == pytest.approx(
        statistics.median(o / p for o, p in zip(ours_times, peft["times_s"], strict=True)))
