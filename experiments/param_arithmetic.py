"""LoRA parameter arithmetic, counted by ``lorafy`` itself on abstract shapes (nothing allocated).

Claims checked: a 4096x4096 weight at r=8 trains 65,536 parameters instead of 16,777,216
(256x fewer); the whole of Llama-2-7B / 70B at r=8 on the attention and MLP projections.
Every tree here is ``jax.ShapeDtypeStruct`` leaves: the models are built with
``jax.eval_shape(model.init_params)`` and ``lorafy`` runs under ``jax.eval_shape``.

    python -m experiments.param_arithmetic

Writes experiments/results/param_arithmetic.json and .png and prints a table.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp

import lora_jax as lj
from experiments import RESULTS
from lora_jax.models import LLAMA_CONFIGS, LlamaForCausalLM, llama_config

TARGET_SETS = {
    "q,v (LoRA paper)": r"layers/self_attn/[qv]_proj/kernel",
    "attention q,k,v,o": r"layers/self_attn/[qkvo]_proj/kernel",
    "attention + MLP": r"layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel",
}


def abstract_lorafy(tree, rank, targets):
    """``lorafy`` under ``jax.eval_shape``: returns a tree of ShapeDtypeStructs."""
    out = jax.eval_shape(lambda p: lj.lorafy(p, rank=rank, targets=targets), tree)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(out))
    return out


def single_matrix(n=4096, rank=8) -> dict:
    tree = {"w": {"kernel": jax.ShapeDtypeStruct((n, n), jnp.float32)}}
    c = lj.count_params(abstract_lorafy(tree, rank, "w/kernel"))
    return {"shape": [n, n], "rank": rank, "trainable": c["trainable"], "full": n * n,
            "reduction": n * n / c["trainable"]}


def llama(name: str, ranks=(8, 16, 64)) -> list[dict]:
    model = LlamaForCausalLM(llama_config(name))
    base = jax.eval_shape(model.init_params, jax.random.key(0))
    total = sum(x.size for x in jax.tree.leaves(base))
    rows = []
    for tname, rx in TARGET_SETS.items():
        for r in ranks:
            c = lj.count_params(abstract_lorafy(base, r, rx))
            assert c["total"] == total + c["trainable"]
            rows.append({"model": name, "targets": tname, "rank": r, "trainable": c["trainable"],
                         "base_params": total, "percent_of_base": 100.0 * c["trainable"] / total,
                         "reduction": total / c["trainable"]})
    return rows


def closed_form(name: str, rank: int) -> int:
    """r * (in + out) summed over the 7 projections of every layer, from the config alone."""
    c = LLAMA_CONFIGS[name]
    d, f, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    kv = d // c["num_attention_heads"] * c["num_key_value_heads"]
    per = (d + d) * 2 + (d + kv) * 2 + (d + f) * 3
    return rank * per * L


def main():
    single = single_matrix()
    rows = llama("Llama-2-7B") + llama("Llama-2-70B")
    for r in rows:
        if r["targets"] == "attention + MLP":
            assert r["trainable"] == closed_form(r["model"], r["rank"]), r
    res = {"single_matrix": single, "llama": rows,
           "note": "counted by lorafy on jax.ShapeDtypeStruct trees (jax.eval_shape); "
                   "base = every parameter of the Flax Llama incl. embeddings and lm_head"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "param_arithmetic.json").write_text(json.dumps(res, indent=2))

    print(f"4096x4096 at r=8: {single['trainable']:,} trainable vs {single['full']:,} "
          f"({single['reduction']:.0f}x fewer)")
    print(f"{'model':12} {'targets':20} {'r':>3} {'trainable':>14} {'base':>16} {'%':>8} "
          f"{'fewer':>8}")
    for r in rows:
        print(f"{r['model']:12} {r['targets']:20} {r['rank']:>3} {r['trainable']:>14,} "
              f"{r['base_params']:>16,} {r['percent_of_base']:>7.3f}% {r['reduction']:>7.0f}x")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120, sharey=True)
    for ax, name in zip(axes, ("Llama-2-7B", "Llama-2-70B")):
        for tname in TARGET_SETS:
            sel = [r for r in rows if r["model"] == name and r["targets"] == tname]
            ax.plot([r["rank"] for r in sel], [r["percent_of_base"] for r in sel], "o-",
                    label=tname)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("rank r")
        ax.set_title(f"{name}: trainable % of base", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("% of parameters trained")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "param_arithmetic.png")
    return res


if __name__ == "__main__":
    main()
