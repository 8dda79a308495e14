"""Side-by-side benchmarks in one run: our transform vs a hand-written LoRA, LoRA vs full
fine-tuning, QLoRA vs LoRA, and peers (HF PEFT on torch, qwix) on the same config.

    python -m experiments.bench                     # ~25M-param reference Llama, 2048 tok/step
    python -m experiments.bench --model smollm2     # SmolLM2-135M architecture (random init)

Every variant is compiled first; FLOPs come from XLA's cost analysis and bytes from
``compiled.memory_analysis()``; wall time is the median of interleaved repetitions
(variant order rotates each round), so machine noise hits all variants alike. HF PEFT
steps in its own process as one more member of the same rotation.
Writes experiments/results/bench_<model>.json and prints a table of ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import resource
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from experiments import REPO, RESULTS, repo_relative
from lora_jax.models import LlamaConfig, LlamaForCausalLM, llama, lm_loss
from lora_jax.recipes import reexec_with_malloc_tunables

TARGETS = r"layers/(self_attn|mlp)/\w+_proj/kernel"

CONFIGS = {
    # ~25M parameters: 4 layers, d=512, GQA, 8k vocab.
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False),
    # SmolLM2-135M's architecture.
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
}


# ----------------------------------------------------------------------------- hand-written LoRA

class HandLoraDense(nn.Module):
    """The limit for our transform: explicit A/B matmuls written into the model."""
    features: int
    rank: int
    scale: float
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        d_in = x.shape[-1]
        k = self.param("kernel", nn.initializers.normal(0.02), (d_in, self.features),
                       self.param_dtype)
        a = self.param("lora_a", nn.initializers.he_uniform(), (d_in, self.rank), self.param_dtype)
        b = self.param("lora_b", nn.initializers.normal(0.02), (self.rank, self.features),
                       self.param_dtype)
        x = x.astype(self.dtype)
        y = x @ jax.lax.stop_gradient(k).astype(self.dtype)
        s = jnp.asarray(self.scale, self.dtype)
        return y + ((x @ a.astype(self.dtype)) * s) @ b.astype(self.dtype)


@contextlib.contextmanager
def hand_written(rank, scale):
    """Swap the reference Llama's (private) Dense factory for HandLoraDense."""
    orig = llama._dense

    def dense(cfg, features, use_bias, name):
        return HandLoraDense(features, rank, scale, cfg.dtype, cfg.param_dtype, name=name)

    llama._dense = dense
    try:
        yield
    finally:
        llama._dense = orig


# ----------------------------------------------------------------------------- helpers

def ce_loss(logits, ids):
    logits = logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def flops(compiled):
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", float("nan")))


def mem(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return {}
    return {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                            "temp_size_in_bytes", "generated_code_size_in_bytes")
            if hasattr(m, k)}


def adam_step(tx, loss_of):
    def step(tr, opt, *rest):
        loss, g = jax.value_and_grad(loss_of)(tr, *rest)
        with jax.numpy_dtype_promotion("standard"):
            upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, loss
    return step


class Variant:
    def __init__(self, name, fn, args, donate=()):
        self.name = name
        self.jitted = jax.jit(fn, donate_argnums=donate)
        # donated buffers are consumed: give each variant its own copies
        self.args = tuple(jax.tree.map(jnp.copy, a) if i in donate else a
                          for i, a in enumerate(args))
        self.donate = donate
        self.compiled = self.jitted.lower(*args).compile()
        self.flops = flops(self.compiled)
        self.mem = mem(self.compiled)
        self.times: list[float] = []
        self.run()   # warm up

    def run(self):
        t0 = time.perf_counter()
        out = self.compiled(*self.args)
        jax.block_until_ready(out)
        self.times.append(time.perf_counter() - t0)
        if self.donate:      # steps return (trainable, opt_state, loss): feed the new state back
            self.args = (out[0], out[1], *self.args[2:])
        return out

    @property
    def median(self):
        return statistics.median(self.times[1:]) if len(self.times) > 1 else float("nan")


# ----------------------------------------------------------------------------- peers

def _peft_step(cfg_kwargs, rank, alpha, batch, seq):
    import peft
    import torch
    import transformers
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg_kwargs.items()},
                                      attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(hf_cfg)
    lcfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(model, lcfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, hf_cfg.vocab_size, (batch, seq))

    def step():
        t0 = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step, {"torch": torch.__version__, "peft": peft.__version__,
                  "torch_threads": torch.get_num_threads()}


def peft_worker(*a):
    """Serve PEFT grad steps over a pipe: a line in, one step, its seconds out."""
    import sys
    try:
        step, info = _peft_step(*a)
    except ImportError as e:
        print(json.dumps({"skipped": f"{e}"}), flush=True)
        return
    info["warmup_s"] = step()
    print(json.dumps(info), flush=True)
    for _ in sys.stdin:
        print(json.dumps(step()), flush=True)


class PeftPeer:
    """HF PEFT on torch as one more variant of the interleaved rounds.

    torch runs in its own process (inside this one, XLA's idle CPU thread pools slowed it
    30x) and steps only when asked, so each round times both while the machine is the same.
    """

    name = "step_hf_peft"

    def __init__(self, *a):
        import subprocess
        import sys
        import tempfile
        code = ("import json, sys; from experiments.bench import peft_worker; "
                "peft_worker(*json.loads(sys.argv[1]))")
        self.err = tempfile.TemporaryFile("w+")     # a file, not a pipe: torch's warnings
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(a)], cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True)
        line = self.proc.stdout.readline()
        self.info = json.loads(line) if line else {"skipped": self._stderr()}
        self.times = [self.info["warmup_s"]] if "warmup_s" in self.info else []

    def _stderr(self):
        self.err.seek(0)
        return self.err.read()[-500:]

    @property
    def ok(self):
        return "skipped" not in self.info

    def run(self):
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the PEFT process died: {self._stderr()}")
        self.times.append(json.loads(line))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.proc.stdout.close()
        self.err.close()

    median = Variant.median       # the same rule: the warm-up step is left out

    def report(self):
        return {**self.info, "median_s": self.median, "times_s": self.times[1:]} if self.ok \
            else self.info


def qwix_variant(model, ids, rank, alpha, tx):
    try:
        import qwix
    except ImportError as e:
        return None, f"{e}"
    provider = qwix.LoraProvider([qwix.LoraRule(module_path=".*(proj).*", rank=rank, alpha=alpha)])
    qmodel = qwix.apply_lora_to_model(model, provider)   # linen: no example inputs
    variables = qmodel.init(jax.random.key(3), ids)
    params = variables["params"]
    # qwix names its factors "<param>_lora_a" / "<param>_lora_b" next to the kernel
    def is_lora(path, _):
        return str(getattr(path[-1], "key", "")).endswith(("lora_a", "lora_b"))

    mask = jax.tree_util.tree_map_with_path(is_lora, params)
    train = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)

    def loss_of(tr, fr, ids):
        return ce_loss(qmodel.apply({"params": lj.combine(tr, fr)}, ids), ids)

    return Variant("step_qwix", adam_step(tx, loss_of), (train, tx.init(train), frozen, ids),
                   donate=(0, 1)), None


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(CONFIGS), default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    ap.add_argument("--only", default=None,
                    help="comma-separated variant names to run (default: all), e.g. "
                         "step_ours,step_ours_fused,step_hand_fused")
    ap.add_argument("--chunk", type=int, default=1024,
                    help="tokens per chunk of the fused cross-entropy variants")
    args = ap.parse_args(argv)
    only = None if args.only is None else set(args.only.split(","))

    cfg_kwargs = CONFIGS[args.model]
    cfg = LlamaConfig(**cfg_kwargs)
    model = LlamaForCausalLM(cfg)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (args.batch, args.seq), 0, cfg.vocab_size, jnp.int32)
    base = model.init(key, ids[:, :8])["params"]
    alpha = 2.0 * args.rank
    tx = optax.adamw(1e-4)

    lp = lj.lorafy(base, rank=args.rank, alpha=alpha, targets=TARGETS, key=key)
    lp = jax.tree.map(lambda x: x, lp)
    tr, fr = lj.split(lp)
    apply = lj.lora(model.apply)

    def fwd_base(p, ids):
        return model.apply({"params": p}, ids)

    def fwd_ours(p, ids):
        return apply({"params": p}, ids)

    def loss_full(p, ids):
        return ce_loss(model.apply({"params": p}, ids), ids)

    def loss_ours(tr, fr, ids):
        return ce_loss(apply({"params": lj.combine(tr, fr)}, ids), ids)

    fused_ours = lj.lora(lambda p, ids: lm_loss(model, p, ids, chunk=args.chunk,
                                                head_grad=False))

    def loss_ours_fused(tr, fr, ids):
        return fused_ours(lj.combine(tr, fr), ids)

    variants = []

    def add(name, fn, args_, donate=()):
        if only is None or name in only:
            variants.append(Variant(name, fn, args_, donate))

    add("fwd_base", fwd_base, (base, ids))
    add("fwd_merged", fwd_base, (lj.merge(lp), ids))
    add("fwd_ours", fwd_ours, (lp, ids))
    add("step_full", adam_step(tx, loss_full), (base, tx.init(base), ids), donate=(0, 1))
    add("step_ours", adam_step(tx, loss_ours), (tr, tx.init(tr), fr, ids), donate=(0, 1))
    add("step_ours_fused", adam_step(tx, loss_ours_fused), (tr, tx.init(tr), fr, ids),
        donate=(0, 1))
    # The hand-written model swaps llama's Dense factory; Variant traces and compiles at
    # construction, so the swap only needs to cover these two.
    with hand_written(args.rank, alpha / args.rank):
        hand_model = LlamaForCausalLM(cfg)
        hp = hand_model.init(key, ids[:, :8])["params"]
        h_mask = jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key in ("lora_a", "lora_b"), hp)
        h_tr = jax.tree.map(lambda m, p: p if m else None, h_mask, hp)
        h_fr = jax.tree.map(lambda m, p: None if m else p, h_mask, hp)

        def fwd_hand(p, ids):
            return hand_model.apply({"params": p}, ids)

        def loss_hand(tr, fr, ids):
            return ce_loss(hand_model.apply({"params": lj.combine(tr, fr)}, ids), ids)

        def loss_hand_fused(tr, fr, ids):
            return lm_loss(hand_model, lj.combine(tr, fr), ids, chunk=args.chunk,
                           head_grad=False)

        add("fwd_hand", fwd_hand, (hp, ids))
        add("step_hand", adam_step(tx, loss_hand), (h_tr, tx.init(h_tr), h_fr, ids),
            donate=(0, 1))
        add("step_hand_fused", adam_step(tx, loss_hand_fused),
            (h_tr, tx.init(h_tr), h_fr, ids), donate=(0, 1))
    qp = lj.lorafy(lj.quantize(base, "nf4", targets=TARGETS), rank=args.rank, alpha=alpha,
                   targets=TARGETS, key=key)
    q_tr, q_fr = lj.split(qp)
    add("step_qlora", adam_step(tx, loss_ours), (q_tr, tx.init(q_tr), q_fr, ids),
        donate=(0, 1))
    add("step_qlora_fused", adam_step(tx, loss_ours_fused), (q_tr, tx.init(q_tr), q_fr, ids),
        donate=(0, 1))
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), base)
    bp = lj.lorafy(bf, rank=args.rank, alpha=alpha, targets=TARGETS, key=key)
    b_tr, b_fr = lj.split(bp)
    add("step_lora_bf16base", adam_step(tx, loss_ours), (b_tr, tx.init(b_tr), b_fr, ids),
        donate=(0, 1))
    qwix_note = None
    if not args.no_peers and (only is None or "step_qwix" in only):
        try:
            qv, qwix_note = qwix_variant(model, ids, args.rank, alpha, tx)
        except Exception as e:                      # a peer failing must not sink the run
            qv, qwix_note = None, f"qwix failed: {type(e).__name__}: {e}"
        if qv is not None:
            variants.append(qv)

    peer = None if args.no_peers else PeftPeer(cfg_kwargs, args.rank, alpha, args.batch,
                                                  args.seq)
    rotation = variants + ([peer] if peer is not None and peer.ok else [])
    # Interleaved repetitions: rotate the order each round.
    for r in range(args.reps):
        order = rotation[r % len(rotation):] + rotation[:r % len(rotation)]
        for v in order:
            v.run()
    peft = None
    if peer is not None:
        peer.close()
        peft = peer.report()

    by = {v.name: v for v in variants}
    rows = {v.name: {"flops": v.flops, "median_s": v.median, "times_s": v.times[1:],
                     "memory": v.mem} for v in variants}

    def ratio(a, b, what):
        if a not in by or b not in by:
            return None
        x, y = (by[a].flops, by[b].flops) if what == "flops" else (by[a].median, by[b].median)
        return x / y

    ratios = {
        "ours/hand grad-step FLOPs": ratio("step_ours", "step_hand", "flops"),
        "ours/hand grad-step wall": ratio("step_ours", "step_hand", "wall"),
        "ours/hand forward wall": ratio("fwd_ours", "fwd_hand", "wall"),
        "merged/base forward wall": ratio("fwd_merged", "fwd_base", "wall"),
        "LoRA/full grad-step FLOPs (ours)": ratio("step_ours", "step_full", "flops"),
        "LoRA/full grad-step FLOPs (hand)": ratio("step_hand", "step_full", "flops"),
        "LoRA/full grad-step wall (ours)": ratio("step_ours", "step_full", "wall"),
        "QLoRA/LoRA grad-step wall": ratio("step_qlora", "step_ours", "wall"),
        "QLoRA/LoRA grad-step wall (fused CE)": ratio("step_qlora_fused", "step_ours_fused",
                                                      "wall"),
        "ours/hand grad-step FLOPs (fused CE)": ratio("step_ours_fused", "step_hand_fused",
                                                      "flops"),
        "ours/hand grad-step wall (fused CE)": ratio("step_ours_fused", "step_hand_fused",
                                                     "wall"),
        "fused/full-logits CE grad-step wall (ours)": ratio("step_ours_fused", "step_ours",
                                                            "wall"),
        "bf16-base LoRA/LoRA grad-step wall": ratio("step_lora_bf16base", "step_ours", "wall"),
        "ours/qwix grad-step wall": ratio("step_ours", "step_qwix", "wall"),
    }
    if peft and "median_s" in peft:
        for name, label in (("step_ours", ""), ("step_ours_fused", " (ours: fused CE)")):
            if name in by:
                ratios[f"ours/HF PEFT grad-step wall{label}"] = by[name].median / peft["median_s"]
                # same round, same machine state: robust to drift over the run
                ratios[f"ours/HF PEFT grad-step wall{label}, median of rounds"] = \
                    statistics.median(a / b for a, b in zip(by[name].times[1:], peft["times_s"]))
    report = {
        "model": args.model, "config": cfg_kwargs, "batch": args.batch, "seq": args.seq,
        "tokens_per_step": args.batch * args.seq, "rank": args.rank, "reps": args.reps,
        "params": int(sum(x.size for x in jax.tree.leaves(base))),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, jax {jax.__version__} "
                   f"{jax.default_backend()}",
        "chunk": args.chunk, "only": args.only,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),   # PEFT's process inherits it
        "variants": rows, "ratios": ratios, "peft": peft, "qwix_note": qwix_note,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    out = args.out or RESULTS / f"bench_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))

    print(f"{args.model}: {report['params'] / 1e6:.1f}M params, {args.batch}x{args.seq} tokens, "
          f"r={args.rank}, {report['machine']}")
    print(f"{'variant':22s} {'GFLOP':>9s} {'median s':>9s} {'temp MB':>9s} {'args MB':>9s}")
    for v in variants:
        print(f"{v.name:22s} {v.flops / 1e9:9.1f} {v.median:9.3f} "
              f"{v.mem.get('temp_size_in_bytes', 0) / 2**20:9.1f} "
              f"{v.mem.get('argument_size_in_bytes', 0) / 2**20:9.1f}")
    if peft:
        print(f"{'step_hf_peft (torch)':22s} {'':>9s} {peft.get('median_s', float('nan')):9.3f}")
    for k, v in ratios.items():
        if v is not None:
            print(f"{k:40s} {v:6.3f}")
    print(f"wrote {repo_relative(out)}")
    return report


if __name__ == "__main__":
    reexec_with_malloc_tunables()   # both arms inherit it
    main()
