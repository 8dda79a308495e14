"""Shared runner for the sentiment-task sweeps (rank_sweep.py, qlora_vs_lora.py)."""

from __future__ import annotations

import dataclasses
import json
import time

from experiments import REPO, RESULTS, repo_relative
from lora_jax.recipes.finetune import FinetuneConfig, finetune

__all__ = ["FinetuneConfig", "RESULTS", "run", "smooth", "write"]

# Each run's working directory (finetune's summary.json), under the gitignored runs/.
RUNS = REPO / "runs" / "sweep"

KEEP = ("accuracy_before", "accuracy_after", "predicted_after", "loss_first", "loss_last10",
        "losses", "trainable_params", "total_params", "trainable_percent",
        "optimizer_state_bytes", "base_stored_bytes", "train_seconds",
        "steady_seconds_per_step", "wall_seconds", "heldout_examples")


def run(label: str, base: FinetuneConfig, **changes) -> dict:
    out = RUNS / label.replace(" ", "_").replace("=", "")
    cfg = dataclasses.replace(base, progress=False, save=False, plot=False, out=str(out),
                              overwrite=True,
                              **changes)
    t0 = time.perf_counter()
    s = finetune(cfg, log=lambda *a: None)
    config = dataclasses.asdict(cfg) | {"out": repo_relative(out)}
    row = {"label": label, "config": config, **{k: s[k] for k in KEEP}}
    print(f"  {label:14} acc {row['accuracy_after']:.3f}  loss(last10) {row['loss_last10']:.3f}  "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    return row


def write(name: str, payload: dict):
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))


def smooth(x, w=5):
    import numpy as np
    x = np.asarray(x, float)
    if len(x) < w:
        return np.arange(1, len(x) + 1), x
    return np.arange(w, len(x) + 1), np.convolve(x, np.ones(w) / w, mode="valid")
