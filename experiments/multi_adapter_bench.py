"""Mixed-adapter batches: one jitted forward where every row uses its own adapter, against
the same batch through one adapter, and against running each adapter's rows separately.

    python -m experiments.multi_adapter_bench            # reference Llama, d=256, 4 layers
    python -m experiments.multi_adapter_bench --hidden 512 --batch 16

Variants (forward pass = prefill logits, batch B x T tokens, N adapters of rank r on every
attention/MLP projection):

* ``base``: the frozen model, no adapter;
* ``merged``: one adapter merged into the weights (the serving floor for one adapter);
* ``single``: one adapter through ``lora(apply)`` (x@W0 + s(x@A)@B), whole batch;
* ``mixed``: a MultiLoraWeight tree, rows spread over the N adapters (and one base row),
  one call: x@W0 once for the batch + gathered per-row A/B;
* ``mixed_same``: the mixed tree with every row on adapter 0 (the gather's cost alone);
* ``separate``: each adapter's rows as its own single-adapter call (N calls of B/N rows),
  timed together.

Everything is compiled first; wall times are medians over interleaved rounds (the
variant order rotates each round). Writes experiments/results/multi_adapter_bench.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from experiments import RESULTS, machine, repo_relative, write_json
from lora_jax.models import LlamaConfig, LlamaForCausalLM

TARGETS = r"layers/(self_attn|mlp)/\w+_proj/kernel"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=repo_relative(RESULTS / "multi_adapter_bench.json"))
    args = ap.parse_args()
    B, T, N = args.batch, args.seq, args.adapters
    if B % N:
        raise SystemExit("--batch must be a multiple of --adapters")

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=int(args.hidden * 2.75) // 8 * 8,
                      num_hidden_layers=args.layers, num_attention_heads=8,
                      num_key_value_heads=4, max_position_embeddings=max(T, 128))
    model = LlamaForCausalLM(cfg)
    x = jnp.asarray(np.random.RandomState(0).randint(0, args.vocab, (B, T)))
    base = jax.jit(model.init)(jax.random.key(0), x)["params"]

    def random_b(w, key):
        """A nonzero B (a fresh lorafy has B = 0: every adapter would equal the base)."""
        if not isinstance(w, lj.LoraWeight):
            return w
        return dataclasses.replace(w, b=jax.random.normal(key, w.b.shape, w.b.dtype) * 0.02)

    names = [f"ad{i}" for i in range(N)]
    adapters = {}
    for i, n in enumerate(names):
        lp = lj.lorafy(base, rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS,
                       key=jax.random.key(100 + i))
        adapters[n] = jax.tree.map(lambda w, i=i: random_b(w, jax.random.key(200 + i)), lp,
                                   is_leaf=lambda w: isinstance(w, lj.LoraWeight))
    multi = lj.stack_adapters(adapters)
    apply = lj.lora(model.apply)

    f_base = jax.jit(lambda p, x: model.apply({"params": p}, x))
    f_lora = jax.jit(lambda p, x: apply({"params": p}, x))
    f_multi = jax.jit(lambda p, x, ids: apply({"params": lj.with_adapter_ids(p, ids)}, x))

    # rows: adapters round-robin, the last row on the base model
    rows = [names[i % N] for i in range(B)]
    rows[-1] = None
    ids_mixed = lj.adapter_ids(multi, rows)
    ids_same = jnp.zeros((B,), jnp.int32)
    merged = lj.merge(adapters[names[0]])
    per = B // N
    chunks = [(adapters[n], x[i * per:(i + 1) * per]) for i, n in enumerate(names)]

    variants = {
        "base": lambda: f_base(base, x),
        "merged": lambda: f_base(merged, x),
        "single": lambda: f_lora(adapters[names[0]], x),
        "mixed": lambda: f_multi(multi, x, ids_mixed),
        "mixed_same": lambda: f_multi(multi, x, ids_same),
        "separate": lambda: [f_lora(p, xc) for p, xc in chunks],
    }
    for fn in variants.values():                       # compile + warm
        jax.block_until_ready(fn())
    compiles_multi = f_multi._cache_size()

    # correctness spot check: mixed rows == each row alone
    out = f_multi(multi, x, ids_mixed)
    err = 0.0
    for i, r in enumerate(rows):
        ref = f_base(base, x[i:i + 1]) if r is None else f_lora(adapters[r], x[i:i + 1])
        err = max(err, float(jnp.max(jnp.abs(out[i:i + 1] - ref))))

    times = {k: [] for k in variants}
    order = list(variants)
    for rnd in range(args.rounds):
        rot = order[rnd % len(order):] + order[:rnd % len(order)]
        for k in rot:
            t0 = time.perf_counter()
            jax.block_until_ready(variants[k]())
            times[k].append(time.perf_counter() - t0)
    assert f_multi._cache_size() == compiles_multi == 1, "switching ids recompiled"

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "config": vars(args) | {"out": repo_relative(args.out),
                                "intermediate_size": cfg.intermediate_size,
                                "params": int(sum(p.size for p in jax.tree.leaves(base))),
                                "adapter_params": lj.count_params(adapters[names[0]])["trainable"],
                                "tokens_per_call": B * T},
        "median_s": med,
        "ratio_to_single": {k: med[k] / med["single"] for k in med},
        "all_s": times,
        "mixed_vs_row_alone_max_abs_err": err,
        "jit_compilations_mixed": compiles_multi,
        "machine": machine(),
    }
    out_path = write_json(args.out, result)
    print(f"{'variant':<12} {'median ms':>10} {'x single':>9}")
    for k in order:
        print(f"{k:<12} {med[k] * 1e3:10.2f} {med[k] / med['single']:9.2f}")
    print(f"mixed rows vs alone: max abs err {err:.2e}; compilations of the mixed step: "
          f"{compiles_multi}; wrote {repo_relative(out_path)}")


if __name__ == "__main__":
    main()
