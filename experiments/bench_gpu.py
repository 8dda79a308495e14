"""bf16 LoRA vs QLoRA-NF4 vs hand-written LoRA: training throughput, MFU, memory (one device).

    python -m experiments.bench_gpu                 # on the GPU machine (experiments/bench_gpu.sh)
    python -m experiments.bench_gpu --smoke         # tiny config, any backend (a test runs it)

MFU = achieved model FLOPs / peak. Model FLOPs of a LoRA step are counted as
(2 fwd + 2 dx) * N * tokens + attention (the frozen base needs no weight
gradient), i.e. 4NT rather than the 6NT of full fine-tuning; XLA's own count is
recorded beside it. Peak defaults to the H200's dense bf16 989 TFLOP/s.

The run checks its own figures and exits 1, listing what failed, when one is implausible:
finite losses, 0 < MFU <= 1, ours / hand-written FLOPs <= 1.01 (and wall <= 1.05 on an
accelerator), NF4 / bf16 step time <= 1.10 on an accelerator (reported on CPU), and the NF4
arguments smaller than the bf16 ones. One JSON holds the figures and the checks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from experiments import RESULTS
from experiments.bench import ce_loss, hand_written
from lora_jax.models import LlamaConfig, LlamaForCausalLM

TARGETS = r"layers/(self_attn|mlp)/\w+_proj/kernel"

# TinyLlama-1.1B
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def _step(tx, loss_of):
    def step(tr, opt, fr, ids):
        loss, g = jax.value_and_grad(loss_of)(tr, fr, ids)
        with jax.numpy_dtype_promotion("standard"):   # optax mixes Python floats in
            upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, loss
    return step


def _measure(step, tr, opt, fr, ids, steps: int) -> dict:
    fn = jax.jit(step, donate_argnums=(0, 1))
    compiled = fn.lower(tr, opt, fr, ids).compile()
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    mem = compiled.memory_analysis()
    times, losses = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        tr, opt, loss = compiled(tr, opt, fr, ids)
        loss.block_until_ready()
        losses.append(float(loss))
        if i:
            times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_s": statistics.median(times), "losses": losses,
            "xla_flops": float(ca.get("flops", float("nan"))),
            "argument_gb": getattr(mem, "argument_size_in_bytes", 0) / 1e9,
            "temp_gb": getattr(mem, "temp_size_in_bytes", 0) / 1e9,
            "peak_gb": stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None}


def _variants(cfg, ids, rank, key):
    """``name -> (step, trainable, frozen, context)``: ours over bf16 and NF4, and
    hand-written (its module is built when traced, so it must compile in its context)."""
    tx = optax.adamw(1e-4)
    model = LlamaForCausalLM(cfg)
    base = jax.jit(lambda k: model.init(k, ids[:1, :8])["params"])(key)
    apply = lj.lora(model.apply)

    def loss_ours(tr, fr, ids):
        return ce_loss(apply({"params": lj.combine(tr, fr)}, ids), ids)

    out = {}
    for name, prep in (("lora_bf16", lambda p: p),
                       ("qlora_nf4", lambda p: lj.quantize(p, "nf4", targets=TARGETS))):
        params = lj.lorafy(prep(base), rank=rank, alpha=2 * rank, targets=TARGETS, key=key,
                           dtype=jnp.float32)
        out[name] = (_step(tx, loss_ours), *lj.split(params), contextlib.nullcontext)
    with hand_written(rank, 2.0):
        hand = LlamaForCausalLM(cfg)
        hp = jax.jit(lambda k: hand.init(k, ids[:1, :8])["params"])(key)

        def loss_hand(tr, fr, ids):
            return ce_loss(hand.apply({"params": lj.combine(tr, fr)}, ids), ids)

        is_ab = lambda path, _: path[-1].key in ("lora_a", "lora_b")  # noqa: E731
        tr = jax.tree_util.tree_map_with_path(lambda p, x: x if is_ab(p, x) else None, hp)
        fr = jax.tree_util.tree_map_with_path(lambda p, x: None if is_ab(p, x) else x, hp)
        out["hand_bf16"] = (_step(tx, loss_hand), tr, fr,
                            functools.partial(hand_written, rank, 2.0))
    return out, sum(x.size for x in jax.tree.leaves(base))


def checks(r: dict, accelerator: bool) -> dict:
    """``name -> {"value", "limit", "ok"}``; limits on timing apply on an accelerator only."""
    lora, nf4, hand = r["lora_bf16"], r["qlora_nf4"], r["hand_bf16"]
    finite = all(map(math.isfinite, lora["losses"] + nf4["losses"] + hand["losses"]))
    c = {
        "losses finite": (float(finite), finite),
        "0 < MFU <= 1 (bf16)": (lora["mfu"], 0 < lora["mfu"] <= 1),
        "0 < MFU <= 1 (nf4)": (nf4["mfu"], 0 < nf4["mfu"] <= 1),
        "ours/hand FLOPs <= 1.01": (lora["xla_flops"] / hand["xla_flops"],
                                    lora["xla_flops"] <= 1.01 * hand["xla_flops"]),
        "nf4 arguments < bf16 arguments": (nf4["argument_gb"] / lora["argument_gb"],
                                           nf4["argument_gb"] < lora["argument_gb"]),
    }
    wall = lora["step_s"] / hand["step_s"]
    ratio = nf4["step_s"] / lora["step_s"]
    c["ours/hand wall <= 1.05"] = (wall, wall <= 1.05 or not accelerator)
    c["nf4/bf16 step time <= 1.10"] = (ratio, ratio <= 1.10 or not accelerator)
    return {k: {"value": v, "ok": bool(ok)} for k, (v, ok) in c.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--out", default=None, help="the JSON (default experiments/results/...)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.steps = 2, 64, 3
    cfg = LlamaConfig(**(SMOKE if args.smoke else ONE_B), dtype=jnp.bfloat16,
                      param_dtype=jnp.bfloat16, remat=True)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (args.batch, args.seq), 0, cfg.vocab_size, jnp.int32)
    variants, n_params = _variants(cfg, ids, args.rank, key)
    tokens = args.batch * args.seq
    attn = 4 * cfg.num_hidden_layers * args.batch * args.seq ** 2 * cfg.hidden_size  # fwd+dx
    results = {}
    for name, (step, tr, fr, context) in variants.items():
        with jax.numpy_dtype_promotion("standard"):
            opt = optax.adamw(1e-4).init(tr)
        with context():
            r = _measure(step, tr, opt, fr, ids, args.steps)
        r.update(tokens_per_s=tokens / r["step_s"],
                 mfu=(4 * n_params * tokens + attn) / r["step_s"] / (args.peak_tflops * 1e12))
        results[name] = r
        print(f"{name:10s} {r['step_s'] * 1e3:8.1f} ms/step  {r['tokens_per_s']:10.0f} tok/s  "
              f"MFU {r['mfu'] * 100:5.1f}%  args {r['argument_gb']:.2f} GB  "
              f"temp {r['temp_gb']:.2f} GB  peak {r['peak_gb']} GB")
    accelerator = jax.default_backend() != "cpu"
    results.update(device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
                   jax=jax.__version__, params=int(n_params), tokens_per_step=tokens,
                   checks=checks(results, accelerator))
    out = Path(args.out) if args.out else RESULTS / (
        "bench_gpu_smoke.json" if args.smoke else "bench_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    failed = [k for k, v in results["checks"].items() if not v["ok"]]
    for k, v in results["checks"].items():
        print(f"  {'ok  ' if v['ok'] else 'FAIL'} {k}: {v['value']:.4g}")
    if failed:
        print(f"implausible figures: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
