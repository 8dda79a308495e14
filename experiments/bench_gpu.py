"""bf16 LoRA vs QLoRA-NF4 vs hand-written LoRA: training throughput, MFU, memory (one device).

    python -m experiments.bench_gpu                 # on the GPU machine (experiments/bench_gpu.sh)
    python -m experiments.bench_gpu --smoke         # tiny config, any backend (a test runs it)

MFU = achieved model FLOPs / peak. Model FLOPs of a LoRA step are counted as
(2 fwd + 2 dx) * N * tokens + attention (the frozen base needs no weight
gradient), i.e. 4NT rather than the 6NT of full fine-tuning; XLA's own count is
recorded beside it. Peak defaults to the H200's dense bf16 989 TFLOP/s.

Each variant runs in its own process, so its peak memory is its own: the device
allocator's peak where the backend reports one, else the process's peak resident size
(``peak_source`` says which). The run checks its own figures and exits 1, listing what
failed, when one is implausible: finite losses, 0 < MFU <= 1, ours / hand-written FLOPs
<= 1.01 (and wall <= 1.05 on an accelerator), NF4 / bf16 step time <= 1.10 and NF4 peak
memory below bf16's on an accelerator (reported on CPU), and the NF4 arguments smaller than
the bf16 ones. One JSON holds the figures and the checks.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
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
    if "peak_bytes_in_use" in stats:
        peak, source = stats["peak_bytes_in_use"], "device"
    else:   # Linux reports ru_maxrss in KiB
        peak, source = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host rss"
    return {"step_s": statistics.median(times), "losses": losses,
            "xla_flops": float(ca.get("flops", float("nan"))),
            "argument_gb": getattr(mem, "argument_size_in_bytes", 0) / 1e9,
            "temp_gb": getattr(mem, "temp_size_in_bytes", 0) / 1e9,
            "peak_gb": peak / 1e9, "peak_source": source}


VARIANTS = ("lora_bf16", "qlora_nf4", "hand_bf16")


def _variant(name, cfg, ids, rank, key):
    """``(step, trainable, frozen, context, n_base_params)`` of one variant: ours over bf16
    or NF4, or hand-written (its module is built when traced, so it compiles in its context)."""
    tx = optax.adamw(1e-4)
    if name == "hand_bf16":
        with hand_written(rank, 2.0):
            hand = LlamaForCausalLM(cfg)
            hp = jax.jit(lambda k: hand.init(k, ids[:1, :8])["params"])(key)

        def loss_hand(tr, fr, ids):
            return ce_loss(hand.apply({"params": lj.combine(tr, fr)}, ids), ids)

        is_ab = lambda path, _: path[-1].key in ("lora_a", "lora_b")  # noqa: E731
        tr = jax.tree_util.tree_map_with_path(lambda p, x: x if is_ab(p, x) else None, hp)
        fr = jax.tree_util.tree_map_with_path(lambda p, x: None if is_ab(p, x) else x, hp)
        n = sum(x.size for x in jax.tree.leaves(fr))
        return _step(tx, loss_hand), tr, fr, functools.partial(hand_written, rank, 2.0), n
    model = LlamaForCausalLM(cfg)
    base = jax.jit(lambda k: model.init(k, ids[:1, :8])["params"])(key)
    n = sum(x.size for x in jax.tree.leaves(base))
    apply = lj.lora(model.apply)

    def loss_ours(tr, fr, ids):
        return ce_loss(apply({"params": lj.combine(tr, fr)}, ids), ids)

    if name == "qlora_nf4":
        base = lj.quantize(base, "nf4", targets=TARGETS)
    params = lj.lorafy(base, rank=rank, alpha=2 * rank, targets=TARGETS, key=key,
                       dtype=jnp.float32)
    return (_step(tx, loss_ours), *lj.split(params), contextlib.nullcontext, n)


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
    peak = nf4["peak_gb"] / lora["peak_gb"]
    c["ours/hand wall <= 1.05"] = (wall, wall <= 1.05 or not accelerator)
    c["nf4/bf16 step time <= 1.10"] = (ratio, ratio <= 1.10 or not accelerator)
    c["nf4 peak memory < bf16 peak memory"] = (peak, peak < 1 or not accelerator)
    return {k: {"value": v, "ok": bool(ok)} for k, (v, ok) in c.items()}


def _run_variant(name: str, args) -> dict:
    """One variant's figures, measured in this process."""
    cfg = LlamaConfig(**(SMOKE if args.smoke else ONE_B), dtype=jnp.bfloat16,
                      param_dtype=jnp.bfloat16, remat=True)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (args.batch, args.seq), 0, cfg.vocab_size, jnp.int32)
    step, tr, fr, context, n_params = _variant(name, cfg, ids, args.rank, key)
    tokens = args.batch * args.seq
    attn = 4 * cfg.num_hidden_layers * args.batch * args.seq ** 2 * cfg.hidden_size  # fwd+dx
    with jax.numpy_dtype_promotion("standard"):
        opt = optax.adamw(1e-4).init(tr)
    with context():
        r = _measure(step, tr, opt, fr, ids, args.steps)
    r.update(tokens_per_s=tokens / r["step_s"], params=int(n_params), tokens_per_step=tokens,
             mfu=(4 * n_params * tokens + attn) / r["step_s"] / (args.peak_tflops * 1e12),
             device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
             jax=jax.__version__)
    return r


def _in_own_process(name: str, argv: list[str]) -> dict:
    """``_run_variant`` in a fresh interpreter, so the peak memory is this variant's alone."""
    with tempfile.TemporaryDirectory() as d:
        part = Path(d) / "part.json"
        subprocess.run([sys.executable, "-m", "experiments.bench_gpu", *argv, "--only", name,
                        "--out", str(part)], check=True, cwd=Path(__file__).resolve().parents[1])
        return json.loads(part.read_text())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--only", choices=VARIANTS, help="measure one variant in this process and "
                    "write its figures alone to --out (the full run does this per variant)")
    ap.add_argument("--out", default=None, help="the JSON (default experiments/results/...)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.batch, args.seq, args.steps = 2, 64, 3
    if args.only:
        if args.out is None:
            ap.error("--only needs --out, the file its figures are written to")
        Path(args.out).write_text(json.dumps(_run_variant(args.only, args)))
        return 0
    # The children alone touch the device: a parent holding it (JAX preallocates most of a
    # GPU's memory) would leave them none.
    child_argv = ["--smoke"] if args.smoke else [
        "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
        "--steps", str(args.steps), "--peak-tflops", str(args.peak_tflops)]
    results = {}
    for name in VARIANTS:
        r = results[name] = _in_own_process(name, child_argv)
        print(f"{name:10s} {r['step_s'] * 1e3:8.1f} ms/step  {r['tokens_per_s']:10.0f} tok/s  "
              f"MFU {r['mfu'] * 100:5.1f}%  args {r['argument_gb']:.2f} GB  "
              f"temp {r['temp_gb']:.2f} GB  peak {r['peak_gb']:.2f} GB ({r['peak_source']})",
              flush=True)
    first = results[VARIANTS[0]]
    results.update({k: first[k] for k in ("device", "backend", "jax", "params",
                                          "tokens_per_step")})
    results["checks"] = checks(results, accelerator=first["backend"] != "cpu")
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
