"""NF4 vs FP4 vs int4 reconstruction error on SmolLM2-135M-Instruct's own weights.

Every attention / MLP projection kernel (the ones QLoRA quantizes) is quantized with each
format and dequantized; the table gives the relative Frobenius error ||W - Q(W)|| / ||W||
over all of them and per projection, the storage in bits per parameter, and a functional
check: the mean next-token cross entropy of the model on 64 rotten-tomatoes review
snippets with each quantized base.

Caveat: the embedded checkpoint is a GGUF Q4_1 file, so the "original" weights are already
on a 4-bit grid (blocks of 32 with a scale and a minimum); errors are measured against
those dequantized values.

    python -m experiments.quant_error_smollm2 [--replot]

Writes experiments/results/quant_error_smollm2.json and .png and prints a table.
"""

from __future__ import annotations

import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from experiments import RESULTS
from lora_jax.models import default_model_path, from_pretrained, load_tokenizer
from lora_jax.recipes.finetune.sources import load_rotten_tomatoes

TARGETS = r"layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel"
CONFIGS = [
    ("nf4", dict(kind="nf4", block_size=64, double_quant=True)),
    ("nf4 (no DQ)", dict(kind="nf4", block_size=64, double_quant=False)),
    ("fp4", dict(kind="fp4", block_size=64, double_quant=True)),
    ("int4 g128", dict(kind="int4", group_size=128)),
    ("int4 g64", dict(kind="int4", group_size=64)),
]


def _kernels(params):
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    out = {}
    for p, x in flat:
        path = "/".join(str(getattr(k, "key", k)) for k in p)
        if re.search(TARGETS, path):
            out[path] = x
    return out


def main(n_texts: int = 64, seq_len: int = 64):
    path = default_model_path()
    model, params = from_pretrained(path)
    tok = load_tokenizer(path)
    ref = _kernels(params)

    rows = load_rotten_tomatoes()
    rng = np.random.default_rng(0)
    texts = [rows[i]["text"] for i in rng.choice(len(rows), n_texts, replace=False)]
    ids = np.full((n_texts, seq_len), tok.eos_id, np.int32)
    mask = np.zeros((n_texts, seq_len), np.float32)
    for j, t in enumerate(texts):
        e = tok.encode(t)[:seq_len]
        ids[j, : len(e)] = e
        mask[j, : len(e) - 1] = 1.0

    @jax.jit
    def nll(p):
        logits = model.apply({"params": p}, ids)
        lp = jax.nn.log_softmax(logits[:, :-1], -1)
        t = jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
        m = mask[:, :-1]
        return -jnp.sum(t * m) / jnp.sum(m)

    results = [{"format": "fp32 (GGUF Q4_1 dequantized)", "rel_error": 0.0, "bits_per_param": 32.0,
                "nll": float(nll(params)), "per_module": {}}]
    for name, kw in CONFIGS:
        t0 = time.perf_counter()
        q = jax.jit(lambda p, kw=kw: lj.quantize(p, targets=TARGETS, **kw))(params)
        bpp = lj.bits_per_param(q)["bits_per_param"]
        deq = jax.jit(lj.dequantize)(q)
        got = _kernels(deq)
        num = den = 0.0
        per: dict[str, list[float]] = {}
        for k, w in ref.items():
            w = np.asarray(w, np.float64)
            d = float(np.sum((np.asarray(got[k], np.float64) - w) ** 2))
            s = float(np.sum(w ** 2))
            num, den = num + d, den + s
            mod = k.split("/")[-2]
            per.setdefault(mod, [0.0, 0.0])
            per[mod][0] += d
            per[mod][1] += s
        results.append({"format": name, "config": kw, "rel_error": (num / den) ** 0.5,
                        "bits_per_param": bpp, "nll": float(nll(deq)),
                        "per_module": {m: (a / b) ** 0.5 for m, (a, b) in per.items()},
                        "seconds": time.perf_counter() - t0})
    n_q = sum(int(np.prod(w.shape)) for w in ref.values())
    res = {"model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
           "quantized_params": n_q, "texts": n_texts, "seq_len": seq_len, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quant_error_smollm2.json").write_text(json.dumps(res, indent=2))

    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    print(f"{n_q:,} projection parameters quantized; NLL on {n_texts} review snippets")
    print(f"{'format':30} {'bits/param':>10} {'rel err':>8} {'NLL':>7}  "
          + " ".join(f"{m[:6]:>7}" for m in mods))
    for r in results:
        print(f"{r['format']:30} {r['bits_per_param']:>10.3f} {r['rel_error']:>8.4f} "
              f"{r['nll']:>7.4f}  "
              + " ".join(f"{r['per_module'].get(m, 0.0):>7.4f}" for m in mods))

    plot(res)
    return res


def plot(res):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = res["results"]
    mods = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    qs = results[1:]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    x = np.arange(len(mods))
    w = 0.8 / len(qs)
    for k, r in enumerate(qs):
        axes[0].bar(x + (k - (len(qs) - 1) / 2) * w, [r["per_module"][m] for m in mods], w,
                    label=r["format"])
    axes[0].set_xticks(x, [m.replace("_proj", "") for m in mods])
    axes[0].set_ylabel("relative Frobenius error")
    axes[0].set_title("SmolLM2-135M projections: ||W-Q(W)||/||W||", fontsize=10)
    axes[0].legend(fontsize=7, ncol=3, loc="upper center")
    axes[0].set_ylim(0, 0.17)
    axes[0].grid(alpha=0.3, axis="y")
    axes[1].scatter([r["bits_per_param"] for r in qs], [r["nll"] for r in qs])
    for r in qs:
        axes[1].annotate(r["format"], (r["bits_per_param"], r["nll"]), fontsize=7)
    axes[1].axhline(results[0]["nll"], ls="--", c="gray", label="fp32 base")
    axes[1].set_xlabel("bits per parameter")
    axes[1].set_ylabel("next-token NLL (review snippets)")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / "quant_error_smollm2.png")


if __name__ == "__main__":
    import sys
    if "--replot" in sys.argv:   # redraw the PNG from the saved JSON
        plot(json.loads((RESULTS / "quant_error_smollm2.json").read_text()))
    else:
        main()
