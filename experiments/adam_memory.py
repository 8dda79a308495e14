"""Adam's optimizer-state memory: full fine-tuning vs LoRA, by arithmetic and by optax itself.

Adam keeps two fp32 moments per trained parameter: 8 bytes/param. For a 70B model that is
~560 GB (70e9 x 8; Llama-2-70B's exact 68.98e9 parameters give 551.8 GB) before the
weights, their fp32 master copy and gradients. LoRA trains only A and B.

Both columns are computed twice: ``8 * n_trainable``, and the bytes of
``jax.eval_shape(optax.adamw(...).init, trainable)`` -- optax's real state tree, built on
abstract shapes (nothing is allocated).

    python -m experiments.adam_memory

Writes experiments/results/adam_memory.json and .png and prints a table.
"""

from __future__ import annotations

import json

import jax
import optax

import lora_jax as lj
from experiments import RESULTS
from lora_jax.models import LlamaForCausalLM, llama_config

TARGETS = r"layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel"
GB = 1e9


def _state_bytes(tree) -> int:
    tx = optax.adamw(1e-4)
    state = jax.eval_shape(tx.init, tree)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def model_rows(name: str, ranks=(8, 16, 64)) -> list[dict]:
    base = jax.eval_shape(LlamaForCausalLM(llama_config(name)).init_params, jax.random.key(0))
    n = sum(x.size for x in jax.tree.leaves(base))
    rows = [{"model": name, "method": "full fine-tuning", "rank": None, "trainable": n,
             "arithmetic_bytes": 8 * n, "optax_state_bytes": _state_bytes(base)}]
    for r in ranks:
        lp = jax.eval_shape(lambda p, r=r: lj.lorafy(p, rank=r, targets=TARGETS), base)
        trainable, _ = lj.split(lp)
        t = lj.count_params(lp)["trainable"]
        rows.append({"model": name, "method": f"LoRA r={r}", "rank": r, "trainable": t,
                     "arithmetic_bytes": 8 * t, "optax_state_bytes": _state_bytes(trainable)})
    for row in rows:
        row["base_params"] = n
        row["fraction_of_full"] = row["arithmetic_bytes"] / (8 * n)
        # optax adds a scalar step count per Adam state: a few bytes
        assert abs(row["optax_state_bytes"] - row["arithmetic_bytes"]) < 64, row
    return rows


def main():
    rows = model_rows("Llama-2-7B") + model_rows("Llama-2-70B")
    res = {"rows": rows, "nominal_70B_bytes": 70e9 * 8,
           "note": "Adam/AdamW: 2 fp32 moments = 8 bytes per trained parameter; LoRA on the "
                   "attention (q,k,v,o) and MLP (gate,up,down) projections of every layer; "
                   "optax_state_bytes = jax.eval_shape(optax.adamw(1e-4).init, trainable)"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "adam_memory.json").write_text(json.dumps(res, indent=2))
    print(f"nominal 70B x 8 bytes = {70e9 * 8 / GB:.0f} GB")
    print(f"{'model':12} {'method':17} {'trainable':>15} {'Adam state':>11} {'optax':>11} "
          f"{'of full':>9}")
    for r in rows:
        print(f"{r['model']:12} {r['method']:17} {r['trainable']:>15,} "
              f"{r['arithmetic_bytes'] / GB:>8.2f} GB {r['optax_state_bytes'] / GB:>8.2f} GB "
              f"{100 * r['fraction_of_full']:>8.3f}%")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=120)
    methods = [r["method"] for r in rows if r["model"] == "Llama-2-7B"]
    x = np.arange(len(methods))
    for k, name in enumerate(("Llama-2-7B", "Llama-2-70B")):
        vals = [r["arithmetic_bytes"] / GB for r in rows if r["model"] == name]
        bars = ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, label=name)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3g}", ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(x, methods)
    ax.set_yscale("log")
    ax.set_ylabel("Adam state (GB, 8 bytes/param)")
    ax.set_title("Optimizer state: full fine-tuning vs LoRA (attention + MLP)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "adam_memory.png")
    return res


if __name__ == "__main__":
    main()
