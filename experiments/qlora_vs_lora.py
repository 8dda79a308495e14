"""QLoRA (NF4 base, default or LoftQ init) vs LoRA (fp32 base): quality at the same budget.

Same model (SmolLM2-135M-Instruct), data, held-out set (split seed 0 for every run), rank
(8, alpha 16), lr and steps; the arms differ only in the base weights and the A/B init:

* ``fp32``: LoRA on the float base (``--quant none``);
* ``nf4``: QLoRA, A random and B = 0, so training starts at ``deq(Q(W))``;
* ``nf4+loftq``: QLoRA with LoftQ init (``--init loftq``, one iteration as PEFT's default):
  A/B start as the top-8 SVD of ``W - deq(Q(W))``, so the model starts nearer the float one.

Each arm runs once per seed (``--seeds``; the seed draws the init and the batch order).

    python -m experiments.qlora_vs_lora [--steps 40] [--batch 16] [--seeds 0 1]

Writes experiments/results/qlora_vs_lora.json and .png and prints a table.
"""

from __future__ import annotations

import argparse
import statistics

from experiments._sweep import RESULTS, FinetuneConfig, run, smooth, write

ARMS = {"fp32": dict(quant="none"), "nf4": dict(quant="nf4"),
        "nf4+loftq": dict(quant="nf4", init="loftq")}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-size", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    a = ap.parse_args(argv)
    base = FinetuneConfig(steps=a.steps, batch=a.batch, eval_size=a.eval_size, split_seed=0)
    print(f"QLoRA vs LoRA: r=8, {a.steps} steps x batch {a.batch}, {a.eval_size} held-out, "
          f"seeds {a.seeds}", flush=True)
    rows = [run(f"{arm} seed{s}", base, seed=s, **ARMS[arm]) | {"arm": arm, "seed": s}
            for s in a.seeds for arm in a.arms]
    summary = {arm: _summary([r for r in rows if r["arm"] == arm]) for arm in a.arms}
    budget = {"steps": a.steps, "batch": a.batch, "eval_size": a.eval_size, "rank": 8,
              "alpha": 16, "lr": base.lr, "seeds": a.seeds}
    write("qlora_vs_lora", {"budget": budget, "summary": summary, "runs": rows})
    print(f"\n{'arm':10} {'base bytes':>12} {'acc before':>16} {'acc after':>16} "
          f"{'mean':>6} {'loss(last10)':>13}")
    for arm, s in summary.items():
        print(f"{arm:10} {s['base_stored_bytes'] / 1e6:>9.1f} MB "
              f"{' '.join(f'{x:.3f}' for x in s['accuracy_before']):>16} "
              f"{' '.join(f'{x:.3f}' for x in s['accuracy_after']):>16} "
              f"{s['accuracy_after_mean']:>6.3f} "
              f"{' '.join(f'{x:.3f}' for x in s['loss_last10']):>13}")
    _plot(rows)


def _summary(rows) -> dict:
    acc = [r["accuracy_after"] for r in rows]
    return {"seeds": [r["seed"] for r in rows], "accuracy_before": [r["accuracy_before"]
                                                                    for r in rows],
            "accuracy_after": acc, "accuracy_after_mean": statistics.fmean(acc),
            "loss_first": [r["loss_first"] for r in rows],
            "loss_last10": [r["loss_last10"] for r in rows],
            "base_stored_bytes": rows[0]["base_stored_bytes"]}


def _plot(rows):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    colors = {}
    for r in rows:
        x, y = smooth(r["losses"])
        c = colors.setdefault(r["arm"], f"C{len(colors)}")
        ax.plot(x, y, color=c, linestyle="-" if r["seed"] == rows[0]["seed"] else "--",
                label=f"{r['label']}: acc {r['accuracy_before']:.2f} -> "
                      f"{r['accuracy_after']:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("answer loss (mean of 5)")
    ax.set_title("QLoRA (NF4, default / LoftQ init) vs LoRA (fp32), SmolLM2-135M, r=8",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "qlora_vs_lora.png")


if __name__ == "__main__":
    main()
