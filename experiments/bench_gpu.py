"""bf16 LoRA vs QLoRA-NF4 training throughput and MFU on a ~1B Llama (one accelerator).

    python -m experiments.bench_gpu                 # on the GPU machine (experiments/bench_gpu.sh)
    python -m experiments.bench_gpu --smoke         # tiny config, any backend, for CI-like checks

MFU = achieved model FLOPs / peak. Model FLOPs of a LoRA step are counted as
(2 fwd + 2 dx) * N * tokens + attention (the frozen base needs no weight
gradient), i.e. 4NT rather than the 6NT of full fine-tuning; XLA's own cost
analysis is printed beside it. Peak defaults to the H200's dense bf16 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from experiments import RESULTS
from lora_jax.models import LlamaConfig, LlamaForCausalLM

TARGETS = r"layers/(self_attn|mlp)/\w+_proj/kernel"

# TinyLlama-1.1B
ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
             num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args(argv)
    kw = SMOKE if args.smoke else ONE_B
    if args.smoke:
        args.batch, args.seq, args.steps = 2, 64, 3
    cfg = LlamaConfig(**kw, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, remat=True)
    model = LlamaForCausalLM(cfg)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (args.batch, args.seq), 0, cfg.vocab_size, jnp.int32)
    base = jax.jit(lambda k: model.init(k, ids[:1, :8])["params"])(key)
    n_params = sum(x.size for x in jax.tree.leaves(base))
    apply = lj.lora(model.apply)
    tx = optax.adamw(1e-4)

    def loss_of(tr, fr, ids):
        logits = apply({"params": lj.combine(tr, fr)}, ids)[:, :-1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    def step(tr, opt, fr, ids):
        loss, g = jax.value_and_grad(loss_of)(tr, fr, ids)
        upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, loss

    results = {}
    preps = (("lora_bf16", lambda p: p),
             ("qlora_nf4", lambda p: lj.quantize(p, "nf4", targets=TARGETS)))
    for name, prep in preps:
        params = lj.lorafy(prep(base), rank=args.rank, alpha=2 * args.rank, targets=TARGETS,
                           key=key, dtype=jnp.float32)
        tr, fr = lj.split(params)
        opt = tx.init(tr)
        fn = jax.jit(step, donate_argnums=(0, 1))
        compiled = fn.lower(tr, opt, fr, ids).compile()
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        mem = compiled.memory_analysis()
        times = []
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            tr, opt, loss = compiled(tr, opt, fr, ids)
            loss.block_until_ready()
            if i:
                times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        tokens = args.batch * args.seq
        attn = 4 * cfg.num_hidden_layers * args.batch * args.seq ** 2 * cfg.hidden_size  # fwd+dx
        model_flops = 4 * n_params * tokens + attn
        results[name] = {
            "step_s": dt, "tokens_per_s": tokens / dt,
            "mfu": model_flops / dt / (args.peak_tflops * 1e12),
            "xla_flops": float(ca.get("flops", float("nan"))),
            "argument_gb": getattr(mem, "argument_size_in_bytes", 0) / 1e9,
            "temp_gb": getattr(mem, "temp_size_in_bytes", 0) / 1e9,
            "loss": float(loss),
        }
        r = results[name]
        print(f"{name:10s} {dt * 1e3:8.1f} ms/step  {tokens / dt:10.0f} tok/s  "
              f"MFU {r['mfu'] * 100:5.1f}%  args {r['argument_gb']:.2f} GB  "
              f"temp {r['temp_gb']:.2f} GB")
    step_ratio = results["qlora_nf4"]["step_s"] / results["lora_bf16"]["step_s"]
    results["qlora/lora step time"] = step_ratio
    results["device"] = str(jax.devices()[0].device_kind)
    results["jax"] = jax.__version__
    results["params"] = int(n_params)
    print(f"QLoRA/LoRA step time: {results['qlora/lora step time']:.3f}  on {results['device']}")
    out = RESULTS / ("bench_gpu_smoke.json" if args.smoke else "bench_gpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
