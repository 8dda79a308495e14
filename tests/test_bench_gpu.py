"""The accelerator benchmark's reduced mode runs here, so the prepared GPU check cannot rot."""

from __future__ import annotations

import json

from experiments import bench_gpu


def test_bench_gpu_smoke_runs_and_checks_itself(tmp_path):
    out = tmp_path / "bench.json"
    assert bench_gpu.main(["--smoke", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["checks"]) >= {"losses finite", "ours/hand FLOPs <= 1.01",
                                "nf4 arguments < bf16 arguments",
                                "nf4 peak memory < bf16 peak memory"}
    assert all(v["ok"] for v in r["checks"].values())
    for name in ("lora_bf16", "qlora_nf4", "hand_bf16"):
        assert r[name]["tokens_per_s"] > 0 and len(r[name]["losses"]) == 4
        # each variant ran in its own process: a peak of its own, read from the OS on CPU
        assert r[name]["peak_source"] == "host rss" and r[name]["peak_gb"] > 0
    assert r["backend"] == "cpu" and r["params"] == r["hand_bf16"]["params"]


def test_bench_gpu_fails_loudly_on_implausible_figures():
    good = {"losses": [1.0], "mfu": 0.3, "xla_flops": 100.0, "argument_gb": 1.0, "step_s": 1.0,
            "peak_gb": 20.0}
    r = {"lora_bf16": good, "hand_bf16": good,
         "qlora_nf4": {**good, "argument_gb": 0.4, "step_s": 1.5, "losses": [float("nan")],
                       "peak_gb": 21.0}}
    c = bench_gpu.checks(r, accelerator=True)
    assert not c["losses finite"]["ok"] and not c["nf4/bf16 step time <= 1.10"]["ok"]
    assert not c["nf4 peak memory < bf16 peak memory"]["ok"]
    assert c["ours/hand FLOPs <= 1.01"]["ok"] and c["nf4 arguments < bf16 arguments"]["ok"]
    assert bench_gpu.checks(r, accelerator=False)["nf4/bf16 step time <= 1.10"]["ok"]
