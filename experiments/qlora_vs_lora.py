"""QLoRA (NF4 base) vs LoRA (fp32 base): quality on the sentiment task at the same budget.

Same model (SmolLM2-135M-Instruct), data, held-out set, seed, rank (8, alpha 16), lr and
steps; only the base weights differ (``--quant nf4`` vs ``--quant none``; int4 optional).

    python -m experiments.qlora_vs_lora [--steps 40] [--batch 16] [--quants nf4 none]

Writes experiments/results/qlora_vs_lora.json and .png and prints a table.
"""

from __future__ import annotations

import argparse

from experiments._sweep import RESULTS, FinetuneConfig, run, smooth, write


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-size", type=int, default=300)
    ap.add_argument("--quants", nargs="+", default=["nf4", "none"])
    a = ap.parse_args(argv)
    base = FinetuneConfig(steps=a.steps, batch=a.batch, eval_size=a.eval_size)
    print(f"QLoRA vs LoRA: r=8, {a.steps} steps x batch {a.batch}, {a.eval_size} held-out",
          flush=True)
    rows = [run(q if q != "none" else "fp32", base, quant=q) for q in a.quants]
    budget = {"steps": a.steps, "batch": a.batch, "eval_size": a.eval_size, "rank": 8,
              "alpha": 16, "lr": base.lr}
    write("qlora_vs_lora", {"budget": budget, "runs": rows})
    print(f"\n{'base':6} {'base bytes':>12} {'acc before':>10} {'acc after':>9} "
          f"{'loss(last10)':>13} {'s/step':>7}")
    for r in rows:
        print(f"{r['label']:6} {r['base_stored_bytes'] / 1e6:>9.1f} MB "
              f"{r['accuracy_before']:>10.3f} {r['accuracy_after']:>9.3f} "
              f"{r['loss_last10']:>13.3f} {r['steady_seconds_per_step']:>7.2f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for r in rows:
        x, y = smooth(r["losses"])
        acc = f"acc {r['accuracy_before']:.2f} -> {r['accuracy_after']:.3f}"
        ax.plot(x, y, label=f"{r['label']} base: {acc}")
    ax.set_xlabel("step")
    ax.set_ylabel("answer loss (mean of 5)")
    ax.set_title("QLoRA (NF4 base) vs LoRA (fp32 base), SmolLM2-135M, r=8", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "qlora_vs_lora.png")


if __name__ == "__main__":
    main()
