"""Many fine-tunes served by one process: decoding where every batch row has its own adapter
(``generate(..., adapter_ids=...)``), against one adapter, merged weights and one call per
adapter.

    python -m experiments.multi_adapter_generate            # reference Llama, d=256, 4 layers
    python -m experiments.multi_adapter_generate --smoke    # tiny, seconds (a test runs it)

Greedy decoding of B prompts of T tokens, n new tokens, with a KV cache; adapters of rank r
on every attention/MLP projection. Variants:

* ``single``: the whole batch through one adapter, ``lora(model.apply)`` on a lorafied tree;
* ``mixed_N`` (N = 1, 4, 16): one stacked tree of max(N) adapters, the rows in N equal
  blocks, block k on adapter k: one call, each step runs ``x @ W0`` once for the batch plus
  each row's gathered A/B. All share one compilation (the ids are data);
* ``merged``: adapter 0 merged into the weights, plain ``model.apply`` (the floor);
* ``separate_N`` (N = 4, 16): the same rows as ``mixed_N``, one ``generate`` call per
  adapter on its B/N rows.

Figures: new tokens/s = B*n / wall of the call(s), prefill included; decode tokens/s =
B*(n-1) / (wall(n) - wall(1)), the prompt's prefill and first token taken out (every variant
is also timed with n = 1); both as ratios to ``single``. Wall times are medians over
interleaved rounds (the variant order rotates each round), after compiling everything.

Before timing, every variant's tokens must equal the per-row reference (each row decoded
alone with its own single-adapter tree) and switching the mixed ids must not recompile;
otherwise the run exits 1. Writes experiments/results/multi_adapter_generate.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
from experiments import RESULTS, machine, repo_relative, write_json
from lora_jax.models import LlamaConfig, LlamaForCausalLM, decoding, generate

TARGETS = r"layers/(self_attn|mlp)/\w+_proj/kernel"


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mixed", default="1,4,16", help="distinct adapters in the mixed batch")
    ap.add_argument("--separate", default="4,16", help="adapters run as separate calls")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--smoke", action="store_true", help="tiny model, a check that it runs")
    ap.add_argument("--out", default=None, help="the JSON (default experiments/results/...)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.batch = 32, 2, 128, 4
        args.prompt, args.new, args.rank, args.rounds = 6, 4, 2, 2
        args.mixed, args.separate = "1,2,4", "4"
    args.mixed = [int(n) for n in args.mixed.split(",")]
    args.separate = [int(n) for n in args.separate.split(",")]
    if any(args.batch % n for n in args.mixed + args.separate):
        raise SystemExit("--batch must be a multiple of every --mixed and --separate count")
    args.out = args.out or str(RESULTS / ("multi_adapter_generate_smoke.json" if args.smoke
                                          else "multi_adapter_generate.json"))
    return args


def _setup(args):
    """The model, its base tree and max(N) random adapters (nonzero A and B)."""
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                      intermediate_size=int(args.hidden * 2.75) // 8 * 8,
                      num_hidden_layers=args.layers, num_attention_heads=8,
                      num_key_value_heads=4, max_position_embeddings=args.prompt + args.new)
    model = LlamaForCausalLM(cfg)
    base = model.init_params(jax.random.key(0))
    # Larger weights give peaked logits, so greedy tokens have no near-ties that rounding
    # differences between equivalent computations could flip.
    base = jax.tree.map(lambda p: p * 4.0 if p.ndim > 1 and p.shape[-2] != args.vocab else p,
                        base)
    ads = [lj.lorafy(base, rank=args.rank, alpha=2.0 * args.rank, targets=TARGETS,
                     key=jax.random.key(100 + k), init=False)     # A and B both random
           for k in range(max(args.mixed + args.separate))]
    return model, base, ads


def _blocks(B: int, n: int) -> list[int]:
    return [i * n // B for i in range(B)]


def _variants(args, model, base, ads, prompt):
    """``name -> run(n_new) -> tokens [B, T + n_new]``."""
    B, app = prompt.shape[0], lj.lora(model.apply)
    multi = lj.stack_adapters({f"ad{k}": a for k, a in enumerate(ads[:max(args.mixed)])})
    merged = lj.merge(ads[0])
    v = {"single": lambda n: generate(model, ads[0], prompt, n, apply_fn=app)}
    for N in args.mixed:
        ids = _blocks(B, N)
        v[f"mixed_{N}"] = lambda n, ids=ids: generate(model, multi, prompt, n, adapter_ids=ids)
    v["merged"] = lambda n: generate(model, merged, prompt, n)
    for N in args.separate:
        per = B // N
        v[f"separate_{N}"] = lambda n, N=N, per=per: jnp.concatenate([
            generate(model, ads[k], prompt[k * per:(k + 1) * per], n, apply_fn=app)
            for k in range(N)])
    return v, app


def _check(args, model, ads, app, prompt, variants) -> dict:
    """Each variant's tokens against every row decoded alone with its own adapter."""
    B, ref = prompt.shape[0], {}

    def alone(i, k):
        if (i, k) not in ref:
            ref[i, k] = np.asarray(generate(model, ads[k], prompt[i], args.new, apply_fn=app))
        return ref[i, k]

    assign = {"single": [0] * B, "merged": [0] * B}
    assign.update({f"{kind}_{N}": _blocks(B, N) for kind, ns in
                   (("mixed", args.mixed), ("separate", args.separate)) for N in ns})
    wrong, compiles = {}, {}
    for name, run in variants.items():
        before = decoding._generate_jit._cache_size()
        toks = np.asarray(run(args.new))
        compiles[name] = decoding._generate_jit._cache_size() - before
        want = np.stack([alone(i, k) for i, k in enumerate(assign[name])])
        wrong[name] = int((toks != want).any(axis=1).sum())
    return wrong, compiles


def _time(variants, news, rounds):
    times = {(k, n): [] for k in variants for n in news}
    order = list(times)
    for rnd in range(rounds):
        for k, n in order[rnd % len(order):] + order[:rnd % len(order)]:
            t0 = time.perf_counter()
            jax.block_until_ready(variants[k](n))
            times[k, n].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, times


def checks(wrong: dict, recompiles: dict, decode_tok_s: dict, timing: bool = True) -> dict:
    """``{check: {"value", "ok"}}`` from the rows differing from the per-row reference per
    variant, the compilations each later mixed variant added, and decode tokens/s (checked
    only with ``timing``: in the smoke run a few tiny steps drown in timer noise)."""
    slowest = min(decode_tok_s.values())
    c = {"tokens equal the per-row reference": (wrong, not any(wrong.values())),
         "mixed ids switch without recompiling": (recompiles, not any(recompiles.values())),
         "decode tokens/s > 0": (slowest, slowest > 0 or not timing)}
    return {k: {"value": v, "ok": bool(ok)} for k, (v, ok) in c.items()}


def main(argv=None) -> int:
    args = _args(argv)
    model, base, ads = _setup(args)
    B, n = args.batch, args.new
    prompt = jnp.asarray(np.random.RandomState(0).randint(0, args.vocab, (B, args.prompt)),
                         jnp.int32)
    variants, app = _variants(args, model, base, ads, prompt)
    wrong, compiles = _check(args, model, ads, app, prompt, variants)
    for run in variants.values():                        # compile the n = 1 calls
        jax.block_until_ready(run(1))
    med, times = _time(variants, (1, n), args.rounds)
    tok_s = {k: B * n / med[k, n] for k in variants}
    dec_s = {k: B * (n - 1) / (med[k, n] - med[k, 1]) for k in variants}
    later_mixed = {k: compiles[k] for k in (f"mixed_{N}" for N in args.mixed[1:])}
    ok = checks(wrong, later_mixed, dec_s, timing=not args.smoke)
    result = {
        "config": vars(args) | {"out": repo_relative(args.out),
                                "intermediate_size": model.config.intermediate_size,
                                "params": int(sum(p.size for p in jax.tree.leaves(base))),
                                "adapter_params": lj.count_params(ads[0])["trainable"]},
        "new_tokens_per_s": tok_s,
        "decode_tokens_per_s": dec_s,
        "new_tokens_ratio_to_single": {k: tok_s[k] / tok_s["single"] for k in variants},
        "decode_ratio_to_single": {k: dec_s[k] / dec_s["single"] for k in variants},
        "median_s": {f"{k}/new={m}": v for (k, m), v in med.items()},
        "all_s": {f"{k}/new={m}": v for (k, m), v in times.items()},
        "checks": ok,
        "machine": machine(),
    }
    out_path = write_json(args.out, result)
    print(f"{'variant':<12} {'new tok/s':>10} {'x single':>9} {'decode tok/s':>13} {'x single':>9}")
    for k in variants:
        print(f"{k:<12} {tok_s[k]:10.0f} {tok_s[k] / tok_s['single']:9.2f} "
              f"{dec_s[k]:13.0f} {dec_s[k] / dec_s['single']:9.2f}")
    for k, c in ok.items():
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {k}: {c['value']}")
    print(f"wrote {repo_relative(out_path)}")
    if not all(c["ok"] for c in ok.values()):
        print("the figures fail their own checks", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
