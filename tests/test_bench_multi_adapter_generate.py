"""The many-adapters decoding benchmark's reduced mode runs here, so it cannot rot."""

from __future__ import annotations

import json

from experiments import multi_adapter_generate as bench

VARIANTS = {"single", "mixed_1", "mixed_2", "mixed_4", "merged", "separate_4"}


def test_multi_adapter_generate_smoke_runs_and_checks_itself(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert all(v["ok"] for v in r["checks"].values())
    assert r["checks"]["tokens equal the per-row reference"]["value"] == dict.fromkeys(VARIANTS, 0)
    assert r["checks"]["mixed ids switch without recompiling"]["value"] == {"mixed_2": 0,
                                                                           "mixed_4": 0}
    assert set(r["decode_tokens_per_s"]) == VARIANTS   # sign unchecked: timer noise
    assert set(r["new_tokens_per_s"]) == VARIANTS and min(r["new_tokens_per_s"].values()) > 0
    assert r["decode_ratio_to_single"]["single"] == 1.0
    assert len(r["all_s"]["mixed_4/new=4"]) == r["config"]["rounds"] == 2


def test_multi_adapter_generate_fails_loudly_on_wrong_tokens_or_recompiles():
    c = bench.checks({"single": 0, "mixed_4": 2}, {"mixed_4": 1}, {"single": 9.0, "mixed_4": 8.0})
    assert not c["tokens equal the per-row reference"]["ok"]
    assert not c["mixed ids switch without recompiling"]["ok"]
    assert c["decode tokens/s > 0"]["ok"]
    noisy = {"single": 9.0, "mixed_4": -1.0}   # wall(n) < wall(1): timer noise
    ok = bench.checks({"single": 0}, {"mixed_4": 0}, noisy)
    assert [k for k, v in ok.items() if not v["ok"]] == ["decode tokens/s > 0"]
    assert all(v["ok"] for v in bench.checks({"single": 0}, {}, noisy, timing=False).values())
