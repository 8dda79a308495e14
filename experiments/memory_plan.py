"""Memory planner: per-device bytes of full fine-tuning vs LoRA vs QLoRA for Llama models.

    python -m experiments.memory_plan [--batch 8] [--seq 512] [--no-remat] [--devices 1 8]
                                       [--models Llama-2-7B ...] [--compile-layers N]

Everything is abstract (``jax.eval_shape`` + ``jit(step).lower(...).compile()``): no
weights are allocated, so 70B models plan on a laptop. Parameters, gradients and optimizer
state are exact per-device byte counts of the sharded leaves; temporaries come from
``compiled.memory_analysis().temp_size_in_bytes`` of the real training step (the one
``make_train_step`` builds: LoRA through ``lora(model.apply)``, gradients only for A/B).
``nn.scan`` over layers keeps the compile cost independent of depth, so every model is
compiled whole (about 10 s each on 2 CPU cores); ``--compile-layers N`` switches to
compiling N and 2N layers and scaling the temporaries per layer.

Setup (defaults): full FT = float32 master weights + float32 AdamW moments, bfloat16
compute; LoRA = bfloat16 base, rank 16 on every layer kernel (q,k,v,o,gate,up,down),
float32 A/B and moments; QLoRA = the same adapters over an NF4 + double-quant base
(embeddings, lm_head and norms stay bfloat16). Remat = every decoder layer
(``nn.remat``; only layer inputs are saved). Devices = a (1, N, 1) FSDP mesh.

Writes experiments/results/memory_plan.json and memory_plan.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

from lora_jax.models import LLAMA_CONFIGS, LlamaForCausalLM, llama_config  # noqa: E402
from lora_jax.scale import plan_memory  # noqa: E402

GiB = 1024 ** 3
LAYER_KERNELS = r"^layers/.*/kernel$"     # adapters (and NF4) on every decoder-layer kernel

MODES = ("full", "lora", "qlora")

SEED_CLAIMS = {
    "adam_70b": "70B Adam state ~560 GB (2 float32 moments x 70e9 params x 4 bytes)",
    "qlora_65b": "QLoRA fine-tunes a 65B model within 48 GB on one GPU (Dettmers et al. 2023)",
}

CPU_VS_GPU = [
    "Temporaries are XLA:CPU's buffer assignment. XLA:GPU fuses differently (e.g. cuDNN/"
    "Triton attention and matmul fusions, bf16 dots kept in bf16) and its scheduler trades "
    "memory for overlap, so GPU temporaries can differ by tens of percent either way.",
    "XLA:CPU has no native bf16 matmul: it converts bf16 operands to f32 around dots, which "
    "adds f32 copies of (dequantized) weights and activations that a GPU would not hold.",
    "The attention here is the reference einsum attention, materializing [B, heads, T, T] "
    "scores; a flash-attention kernel on GPU would not.",
    "No allocator fragmentation, CUDA context (~0.5-1 GB) or NCCL buffers are counted; the "
    "QLoRA paper also pages optimizer state to CPU memory, which this plan does not model.",
    "Parameter, gradient and optimizer bytes are exact for any backend.",
]


def llama(name: str):
    """The planner's model factory for a published Llama config."""
    def make(layers, **dtypes):
        return LlamaForCausalLM(llama_config(name, num_hidden_layers=layers, **dtypes))
    return make


def plan(name: str, mode: str, **kw) -> dict:
    layers = LLAMA_CONFIGS[name]["num_hidden_layers"]
    return plan_memory(llama(name), mode, layers=layers, targets=LAYER_KERNELS, **kw)


def _gib(x):
    return None if x is None else round(x / GiB, 3)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(LLAMA_CONFIGS))
    ap.add_argument("--devices", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--compile-layers", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)

    rows = []
    for name in args.models:
        for n in args.devices:
            for mode in MODES:
                t0 = time.perf_counter()
                r = plan(name, mode, n_devices=n, batch=args.batch, seq=args.seq,
                         remat=not args.no_remat, rank=args.rank,
                         compile=not args.no_compile, compile_layers=args.compile_layers)
                r["model"] = name
                rows.append(r)
                print(f"{name:12s} {mode:5s} x{n}: params {_gib(r['param_bytes']):8.2f} GiB  "
                      f"grads {_gib(r['grad_bytes']):7.3f}  opt {_gib(r['opt_bytes']):8.3f}  "
                      f"temp {_gib(r['temp_bytes'])}  total {_gib(r['total_bytes'])} GiB "
                      f"({time.perf_counter() - t0:.0f}s)", flush=True)

    claims = {}
    if "Llama-2-70B" in args.models and 1 in args.devices and not args.no_compile:
        # The QLoRA paper's setting is a per-GPU batch of 1 with gradient checkpointing.
        r = plan("Llama-2-70B", "qlora", n_devices=1, batch=1, seq=args.seq, remat=True,
                 rank=args.rank)
        r["model"] = "Llama-2-70B"
        claims["qlora_70b_one_device_batch1"] = {k: r[k] for k in (
            "param_bytes", "grad_bytes", "opt_bytes", "temp_bytes", "total_bytes")}
        claims["qlora_70b_one_device_batch1_total_GB"] = round(r["total_bytes"] / 1e9, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if r["model"] == "Llama-2-70B" and r["mode"] == "full" and r["n_devices"] == 1:
            claims["adam_70b_measured_GB"] = round(r["opt_bytes"] / 1e9, 1)
        if r["model"] == "Llama-2-70B" and r["mode"] == "qlora" and r["n_devices"] == 1:
            claims["qlora_70b_one_device_measured_GB"] = (
                None if r["total_bytes"] is None else round(r["total_bytes"] / 1e9, 1))
    doc = {
        "setup": {"batch": args.batch, "seq": args.seq, "remat": not args.no_remat,
                  "rank": args.rank, "jax": jax.__version__, "backend": jax.default_backend(),
                  "notes": __doc__.split("Setup (defaults): ")[1].split("Writes")[0].strip()},
        "seed_claims": SEED_CLAIMS, "measured_vs_claims": claims,
        "cpu_vs_gpu": CPU_VS_GPU,
        "rows": rows,
    }
    (out / "memory_plan.json").write_text(json.dumps(doc, indent=1))
    _plot(rows, out / "memory_plan.png", args)
    print(json.dumps(claims))
    return doc


def _plot(rows, path, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    devs = sorted({r["n_devices"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    parts = [("param_bytes", "parameters"), ("grad_bytes", "gradients"),
             ("opt_bytes", "optimizer state"), ("temp_rest", "other temporaries")]
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    fig, axes = plt.subplots(1, len(devs), figsize=(7 * len(devs), 5), squeeze=False)
    for ax, n in zip(axes[0], devs):
        x = np.arange(len(models))
        w = 0.27
        for j, mode in enumerate(MODES):
            bottom = np.zeros(len(models))
            for (key, label), c in zip(parts, colors):
                vals = []
                for m in models:
                    r = next(r for r in rows if r["model"] == m and r["mode"] == mode
                             and r["n_devices"] == n)
                    if key == "temp_rest":
                        v = max((r["temp_bytes"] or 0) - r["grad_bytes"], 0)
                    else:
                        v = r[key]
                    vals.append(v / 1e9)
                ax.bar(x + (j - 1) * w, vals, w, bottom=bottom, color=c,
                       label=label if j == 0 else None, edgecolor="k", linewidth=0.3)
                bottom += np.array(vals)
            for xi, b in zip(x, bottom):
                ax.text(xi + (j - 1) * w, b, mode, ha="center", va="bottom", fontsize=6,
                        rotation=90)
        ax.axhline(48, color="gray", ls="--", lw=0.8)
        ax.text(len(models) - 0.5, 48, "48 GB", fontsize=7, va="bottom", ha="right")
        ax.axhline(80, color="gray", ls=":", lw=0.8)
        ax.text(len(models) - 0.5, 80, "80 GB", fontsize=7, va="bottom", ha="right")
        ax.set_yscale("log")
        ax.set_xticks(x, models, rotation=15, fontsize=8)
        ax.set_ylabel("GB per device")
        ax.set_title(f"{n} device{'s' if n > 1 else ''} (FSDP), batch {args.batch}, "
                     f"seq {args.seq}, remat={'off' if args.no_remat else 'layer'}")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Per-device training memory: full FT (f32+AdamW) vs LoRA r16 (bf16 base) "
                 "vs QLoRA (NF4+DQ base); bars: full / lora / qlora", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
