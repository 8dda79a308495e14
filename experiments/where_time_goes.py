"""Why the LoRA/full wall-time ratio on XLA:CPU sits above the FLOPs ratio.

    python -m experiments.where_time_goes   # after python -m experiments.bench (reads its JSON)

Measures this machine's dense f32 matmul rate on the model's own projection shapes, then
splits each grad step of experiments/bench.py into matmul time (its XLA FLOPs at that rate)
and the rest (attention softmax, RMSNorm, RoPE, SiLU, the 8k-vocab cross-entropy, the
optimizer update, copies) which LoRA does not shrink.
"""

import json
import statistics
import time

import jax

from experiments import RESULTS


def matmul_rate(tokens=2048, d=512, f=1408, reps=7):
    x = jax.random.normal(jax.random.key(0), (tokens, d))
    w = jax.random.normal(jax.random.key(1), (d, f))
    g = jax.random.normal(jax.random.key(2), (tokens, f))
    fns = {  # the three products of a Dense layer's forward and backward
        "x@W": (jax.jit(lambda x, w: x @ w), (x, w)),
        "g@W.T": (jax.jit(lambda g, w: g @ w.T), (g, w)),
        "x.T@g": (jax.jit(lambda x, g: x.T @ g), (x, g)),
    }
    rates = {}
    for name, (fn, args) in fns.items():
        fn(*args).block_until_ready()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn(*args).block_until_ready()
            ts.append(time.perf_counter() - t0)
        rates[name] = 2 * tokens * d * f / statistics.median(ts)
    return rates


def main():
    bench = json.loads((RESULTS / "bench_small.json").read_text())
    rates = matmul_rate()
    rate = statistics.median(rates.values())
    rows = {}
    for name in ("step_full", "step_ours", "step_hand", "step_qlora"):
        v = bench["variants"].get(name)
        if not v:
            continue
        mm = v["flops"] / rate
        rows[name] = {"wall_s": v["median_s"], "matmul_s": mm, "other_s": v["median_s"] - mm,
                      "other_share": (v["median_s"] - mm) / v["median_s"]}
    full, ours = rows["step_full"], rows["step_ours"]
    out = {"matmul_gflops_per_s": {k: r / 1e9 for k, r in rates.items()}, "rows": rows,
           "flops_ratio": bench["ratios"]["LoRA/full grad-step FLOPs (ours)"],
           "wall_ratio": ours["wall_s"] / full["wall_s"],
           "matmul_only_ratio": ours["matmul_s"] / full["matmul_s"]}
    print("matmul rate GFLOP/s:", {k: round(v, 1) for k, v in out["matmul_gflops_per_s"].items()})
    print(f"{'step':12s} {'wall s':>8s} {'matmul s':>9s} {'other s':>8s} {'other %':>8s}")
    for k, r in rows.items():
        print(f"{k:12s} {r['wall_s']:8.3f} {r['matmul_s']:9.3f} {r['other_s']:8.3f} "
              f"{100 * r['other_share']:7.1f}%")
    print(f"LoRA/full: FLOPs {out['flops_ratio']:.3f}, wall {out['wall_ratio']:.3f}")
    (RESULTS / "where_time_goes.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
