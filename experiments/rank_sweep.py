"""Rank sweep on the sentiment task: LoRA r in {1, 2, 4, 8, 16, 64} and full fine-tuning.

SmolLM2-135M-Instruct (fp32 base: this is LoRA, not QLoRA), rotten-tomatoes sentiment as
in ``lora-jax finetune``, the same held-out set for every run (accuracy by log-likelihood
of the two answers). Budget, smaller than the main job so the whole sweep fits a 2-core
CPU: ``--steps`` (default 30) of batch ``--batch`` (default 8), cosine schedule, lr 2e-3
for every rank. alpha is fixed (``--alpha``, default 16, so the scale is alpha/r) as in the
LoRA paper, which keeps the size of the Adam-driven update roughly independent of r; with
alpha = 2r instead (``--alpha-per-rank 2``) the update grows with r and at this lr r=64
collapsed to a constant answer. Full fine-tuning uses AdamW at lr 5e-5.

    python -m experiments.rank_sweep [--steps 30] [--batch 8] [--seeds 0 1] [--append]

Writes experiments/results/rank_sweep.json and .png and prints a table.
"""

from __future__ import annotations

import argparse

from experiments._sweep import RESULTS, FinetuneConfig, run, smooth, write


def _agg(rows):
    """label -> {"acc": [...], "loss": [...], row of the first seed}, in run order."""
    out = {}
    for r in rows:
        d = out.setdefault(r["label"], {"acc": [], "loss": [], "first": r})
        d["acc"].append(r["accuracy_after"])
        d["loss"].append(r["loss_last10"])
    return out


def main(argv=None):
    import json

    import numpy as np

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64])
    ap.add_argument("--full-lr", type=float, default=5e-5)
    ap.add_argument("--alpha", type=float, default=16.0, help="fixed alpha for every rank")
    ap.add_argument("--alpha-per-rank", type=float, default=None,
                    help="alpha = this x r instead (constant scale alpha/r)")
    ap.add_argument("--no-full", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="init / batch-order seeds (the held-out split is always seed 0)")
    ap.add_argument("--append", action="store_true",
                    help="add these seeds' runs to the existing rank_sweep.json")
    a = ap.parse_args(argv)
    base = FinetuneConfig(quant="none", steps=a.steps, batch=a.batch, eval_size=a.eval_size,
                          lr=2e-3, split_seed=0)
    rows, before = [], None
    if a.append and (RESULTS / "rank_sweep.json").exists():
        old = json.loads((RESULTS / "rank_sweep.json").read_text())
        rows, before = old["runs"], old["accuracy_before"]
    print(f"rank sweep: {a.steps} steps x batch {a.batch}, {a.eval_size} held-out, seeds {a.seeds}",
          flush=True)
    for seed in a.seeds:
        for r in a.ranks:
            alpha = a.alpha if a.alpha_per_rank is None else a.alpha_per_rank * r
            rows.append(run(f"r={r}", base, rank=r, alpha=alpha, seed=seed,
                            eval_before=before is None))
            if before is None:
                before = rows[-1]["accuracy_before"]
        if not a.no_full:
            rows.append(run("full FT", base, rank=0, alpha=None, lr=a.full_lr, seed=seed,
                            eval_before=False))
    seeds = sorted({r["config"]["seed"] for r in rows})
    agg = _agg(rows)
    alpha_label = a.alpha if a.alpha_per_rank is None else f"{a.alpha_per_rank:g}r"
    payload = {"budget": {"steps": a.steps, "batch": a.batch, "eval_size": a.eval_size,
                          "lr_lora": 2e-3, "alpha": alpha_label,
                          "lr_full": a.full_lr, "base": "fp32",
                          "seeds": seeds, "split_seed": 0},
               "accuracy_before": before,
               "summary": {k: {"accuracy_mean": float(np.mean(v["acc"])), "accuracy": v["acc"],
                               "loss_last10_mean": float(np.mean(v["loss"])),
                               "trainable_params": v["first"]["trainable_params"]}
                           for k, v in agg.items()},
               "runs": rows}
    write("rank_sweep", payload)

    print(f"\naccuracy before training: {before:.3f}; seeds {seeds}")
    print(f"{'run':10} {'trainable':>12} {'%':>8} {'acc (mean)':>10} {'per seed':>18} "
          f"{'loss(last10)':>13}")
    for k, v in agg.items():
        f = v["first"]
        print(f"{k:10} {f['trainable_params']:>12,} {f['trainable_percent']:>7.3f}% "
              f"{np.mean(v['acc']):>10.3f} {' '.join(f'{x:.3f}' for x in v['acc']):>18} "
              f"{np.mean(v['loss']):>13.3f}")
    rows = [v["first"] | {"accuracy_after": float(np.mean(v["acc"]))} for v in agg.values()]
    a.steps, a.batch = payload["budget"]["steps"], payload["budget"]["batch"]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for r in rows:
        x, y = smooth(r["losses"])
        axes[0].plot(x, y, label=r["label"], lw=1.3)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"answer loss (mean of 5), seed {seeds[0]}")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    lora_rows = [r for r in rows if r["label"].startswith("r=")]
    axes[1].plot([r["config"]["rank"] for r in lora_rows],
                 [r["accuracy_after"] for r in lora_rows], "o-",
                 label=f"LoRA (mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
    for k, v in agg.items():
        if k.startswith("r="):
            axes[1].scatter([v["first"]["config"]["rank"]] * len(v["acc"]), v["acc"], c="C0",
                            s=10, alpha=0.4)
    for r in rows:
        if r["label"] == "full FT":
            axes[1].axhline(r["accuracy_after"], c="C3", ls="--", label="full fine-tuning")
    axes[1].axhline(before, c="gray", ls=":", label="before training")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("rank r")
    axes[1].set_ylabel("held-out accuracy")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"SmolLM2-135M, rotten-tomatoes, {a.steps} steps x batch {a.batch}", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "rank_sweep.png")
    return payload


if __name__ == "__main__":
    main()
