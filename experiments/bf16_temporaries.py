"""What the compiler upcasts in a LoRA grad step over an fp32, a bf16 and an NF4 base.

    python -m experiments.bf16_temporaries [--layers 2] [--batch 1] [--seq 512] [--rank 16]

Compile-only (abstract shapes, nothing runs) on whatever backend is present. The step is
the one the memory plan compiles (``make_train_step`` on one device, ``cross_entropy_loss(
lora(model.apply))``, AdamW on A/B, remat every layer) for a reference Llama with d=2048,
F=5632, 16 heads, vocab 32000. The optimized HLO (``compiled.as_text()``) is walked for

* every bf16 <-> f32 ``convert``, top level or inside a fusion: its shape; its class
  (``weight``: a frozen weight's shape or size, all layers of a stacked leaf, one layer, or a
  whole unstacked leaf; ``adapter``; ``scores`` [B, H, T, S]; ``logits`` [B, T, V];
  ``activation`` [B, T, ...]; ``other``); whether its result is materialized (a top-level
  convert, or a fusion with an output of the convert's dtype and size); whether the program
  asked for it (metadata ``convert_element_type``) or the compiler added it. Each distinct
  convert is listed once: one inside the layer loop runs per layer, so byte sums over the
  list are not live memory (``memory_analysis()``'s temporaries are);
* every matmul (``dot``, or a gemm/matmul custom call): operand and result dtypes.

Writes experiments/results/bf16_temporaries.json, keeping the runs of other backends and JAX
versions already there for the same setup (one run per "<backend>, jax <version>").
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from experiments import RESULTS, machine, repo_relative, write_json
from lora_jax.models import LlamaConfig, LlamaForCausalLM

TARGETS = r"layers/(self_attn|mlp)/\w+_proj/kernel"
CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
              num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
BASES = ("fp32", "bf16", "nf4")
ITEMSIZE = {"f32": 4, "bf16": 2}
_DEPTH = {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}

# ----------------------------------------------------------------------------- HLO text


def _split_top(s: str, stop: bool = False):
    """``s`` split at commas outside brackets; with ``stop``, the index just past the bracket
    group that opens ``s`` instead."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(s):
        depth += _DEPTH.get(ch, 0)
        if stop and depth == 0:
            return i + 1
        if ch == "," and depth == 0:
            parts.append(s[start:i].strip())
            start = i + 1
    return len(s) if stop else [p for p in parts + [s[start:].strip()] if p]


def _arrays(text: str) -> list:
    """``[(dtype, dims)]`` of a type: an array, or a tuple's arrays (None for a token)."""
    text = re.sub(r"/\*.*?\*/", "", text).strip()
    if text.startswith("("):
        return [a for t in _split_top(text[1:-1]) for a in _arrays(t)]
    m = re.match(r"([a-z]\w*)\[([\d,]*)\]", text)
    return [None if m is None else (m[1], tuple(int(d) for d in m[2].split(",") if d))]


def _instruction(line: str):
    m = re.match(r"\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if m is None:
        return None
    rhs = line[m.end():]
    end = _split_top(rhs, stop=True) if rhs.startswith("(") else rhs.find(" ")
    op = re.match(r"([\w\-]+)\(", rhs[end:].lstrip())
    if op is None:
        return None
    rest = rhs[end:].lstrip()
    close = op.end() - 1 + _split_top(rest[op.end() - 1:], stop=True)
    operands = []
    for o in _split_top(rest[op.end():close - 1]):
        toks = o.split()       # "%x", "x", or "f32[2,3]{1,0} %x" (operand shapes printed)
        operands.append((toks[-1].lstrip("%"), _arrays(toks[0])[0] if len(toks) > 1 else None))
    types = _arrays(rhs[:end])
    return {"name": m[1], "type": types[0] if len(types) == 1 else None, "types": types,
            "op": op[1], "operands": operands, "attrs": rest[close:]}


def parse_hlo(text: str) -> dict:
    """``computation name -> [instruction]`` of an HLO module's text, in either print style
    (names with or without ``%``, operand shapes printed or not)."""
    comps, cur = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split()
            cur = comps.setdefault((head[1] if head[0] == "ENTRY" else head[0]).lstrip("%"), [])
        elif cur is not None and line.startswith(" ") and (ins := _instruction(line)):
            cur.append(ins)
    return comps


def _fusion_owner(comps: dict) -> dict:
    """``fused computation -> the outermost fusion instruction that runs it``."""
    caller = {c: (name, ins) for name, instrs in comps.items() for ins in instrs
              for c in re.findall(r"calls=\{?%?([\w.\-]+)", ins["attrs"])}
    owner = {}
    for comp in caller:
        node, outer = comp, None
        while node in caller:            # up through nested fusions, calls, async wrappers
            node, ins = caller[node]
            outer = ins if ins["op"] == "fusion" else outer
        if outer is not None:
            owner[comp] = outer
    return owner


# ----------------------------------------------------------------------------- classes

def _squeeze(dims) -> tuple:
    return tuple(d for d in dims if d != 1)


def shape_classes(params, cfg: LlamaConfig, batch: int, seq: int) -> dict:
    """What :func:`classify` needs: ``shape -> (class, scope)`` for the weights and adapters
    of ``params`` (the whole leaf, and one layer of a [L, ...] leaf; each also with its last
    two axes swapped; size-1 axes dropped), the weights' sizes, and the step's sizes."""
    table, sizes = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
            params, is_leaf=lambda x: isinstance(x, lj.LoraWeight))[0]:
        stacked = getattr(path[0], "key", None) == "layers"
        parts = [("weight", leaf.shape)] + ([("adapter", leaf.a.shape), ("adapter", leaf.b.shape)]
                                            if isinstance(leaf, lj.LoraWeight) else [])
        for cls, shape in parts:
            if len(shape) - stacked < 2:
                continue                                 # norm scales: not a matrix
            scopes = ([(tuple(shape), "all layers"), (tuple(shape[1:]), "one layer")]
                      if stacked else [(tuple(shape), "whole")])
            for s, scope in scopes:
                for t in (s, s[:-2] + s[-2:][::-1]):
                    table.setdefault(_squeeze(t), (cls, scope))
                if cls == "weight":
                    sizes.setdefault(int(np.prod(s)), scope)
    tokens = {seq, seq - 1, batch * seq, batch * (seq - 1)}
    return {"table": table, "sizes": sizes, "bt": (batch * seq, batch * (seq - 1)),
            "tokens": tokens, "seq": seq, "scores": batch * cfg.num_attention_heads * seq * seq,
            "vocab": cfg.vocab_size,
            # an activation [B*T, d] with B*T = d reads as a [d, d] weight
            "ambiguous": bool(tokens & {d for s in table for d in s})}


def classify(dims: tuple, sc: dict) -> tuple[str, str | None]:
    """``(class, scope)`` of an array shape; scope: which part of a weight it covers.

    A weight's or adapter's shape (size-1 axes aside) wins; then attention scores (last axis
    S, a multiple of B*H*T*S elements), logits (last axis V, B*T*V elements), activations (an
    axis of T or B*T), a weight's element count in another shape (NF4 blocks), activations
    again (a multiple of B*T elements)."""
    if _squeeze(dims) in sc["table"]:
        return sc["table"][_squeeze(dims)]
    n = int(np.prod(dims))
    if dims and dims[-1] == sc["seq"] and n % sc["scores"] == 0:
        return "scores", None
    if dims and dims[-1] == sc["vocab"] and n in [bt * sc["vocab"] for bt in sc["bt"]]:
        return "logits", None
    if set(dims) & sc["tokens"]:
        return "activation", None
    if n in sc["sizes"]:
        return "weight", sc["sizes"][n]
    if n > 1 and any(n % bt == 0 for bt in sc["bt"]):
        return "activation", None
    return "other", None


# ----------------------------------------------------------------------------- analysis

def _operand_types(ins, types, k):
    return [inline or types.get(name) for name, inline in ins["operands"][:k]]


def _materialized(ins, comp, owner) -> bool:
    dtype, dims = ins["type"]         # a multi-output fusion: any of its outputs may match
    return comp not in owner or any(o is not None and o[0] == dtype and np.prod(o[1]) ==
                                    np.prod(dims) for o in owner[comp]["types"])


def converts(comps, owner, sc) -> list[dict]:
    """Every non-scalar bf16 <-> f32 convert, grouped by (direction, shape, class,
    materialized, origin), with ``count`` and ``bytes`` (result bytes x count)."""
    seen = Counter()
    for comp, instrs in comps.items():
        types = {i["name"]: i["type"] for i in instrs}
        for ins in instrs:
            if ins["op"] != "convert" or ins["type"] is None or np.prod(ins["type"][1]) < 2:
                continue
            src = _operand_types(ins, types, 1)[0]
            pair = f"{src and src[0]}->{ins['type'][0]}"
            if pair not in ("bf16->f32", "f32->bf16"):
                continue
            op = re.search(r'op_name="([^"]*)"', ins["attrs"])
            origin = "program" if op and op[1].endswith("convert_element_type") else "compiler"
            seen[(pair, ins["type"][1], *classify(ins["type"][1], sc),
                  _materialized(ins, comp, owner), origin)] += 1
    return [{"direction": d, "shape": list(dims), "class": c, "scope": scope,
             "materialized": mat, "origin": origin, "count": n,
             "bytes": int(np.prod(dims)) * ITEMSIZE[d.split("->")[1]] * n}
            for (d, dims, c, scope, mat, origin), n in sorted(seen.items(), key=str)]


def matmuls(comps, owner, sc) -> list[dict]:
    """Every dot / gemm custom call, grouped by (class, operand dtypes, result dtype, where)."""
    seen = Counter()
    for comp, instrs in comps.items():
        types = {i["name"]: i["type"] for i in instrs}
        for ins in instrs:
            target = re.search(r'custom_call_target="([^"]*(?:gemm|matmul)[^"]*)"', ins["attrs"],
                               re.I)
            ops = _operand_types(ins, types, 2)
            if not (ins["op"] == "dot" or (ins["op"] == "custom-call" and target)) or \
                    len(ops) < 2 or None in ops or ins["types"][0] is None:
                continue
            classes = [classify(o[1], sc)[0] for o in ops + ins["types"][:1]]
            cls = next((c for c in ("weight", "logits", "scores", "adapter") if c in classes),
                       "activation")
            fusion = owner.get(comp)
            kind = fusion and (re.search(r'"kind":"([^"]+)"', fusion["attrs"])
                               or re.search(r"kind=(\w+)", fusion["attrs"]))
            where = target[1] if target else f"fusion {kind[1]}" if kind else "unfused"
            seen[(cls, ops[0][0], ops[1][0], ins["types"][0][0], where)] += 1
    return [{"class": c, "lhs": lhs, "rhs": rhs, "out": out, "where": where, "count": n}
            for (c, lhs, rhs, out, where), n in sorted(seen.items(), key=str)]


def analyze_hlo(text: str, sc: dict) -> dict:
    """Converts, matmuls, byte sums per (materialized or all, direction, class), and the
    materialized bf16 -> f32 copies of whole weight leaves of an optimized HLO text."""
    comps = parse_hlo(text)
    owner = _fusion_owner(comps)
    items = converts(comps, owner, sc)
    sums: dict = {}
    for it in items:
        for scope in ("materialized", "all") if it["materialized"] else ("all",):
            d = sums.setdefault(scope, {}).setdefault(it["direction"], {})
            d[it["class"]] = d.get(it["class"], 0) + it["bytes"]
    whole = [c for c in items if c["direction"] == "bf16->f32" and c["class"] == "weight"
             and c["scope"] != "one layer" and c["materialized"]]
    return {"converts": items, "bytes": sums, "matmuls": matmuls(comps, owner, sc),
            "whole_weight_upcasts": {"shapes": [c["shape"] for c in whole for _ in
                                                range(c["count"])],
                                     "bytes": sum(c["bytes"] for c in whole)}}


# ----------------------------------------------------------------------------- the step

def build(cfg_kwargs: dict, base: str, batch: int, seq: int, rank: int, remat: bool):
    """(train step, abstract step arguments, abstract params, config), as the memory plan
    builds them, on one device."""
    dtype = jnp.float32 if base == "fp32" else jnp.bfloat16
    cfg = LlamaConfig(**cfg_kwargs, dtype=dtype, param_dtype=dtype, remat=remat)
    model = LlamaForCausalLM(cfg)

    def init(key):
        params = model.init(key, jnp.zeros((1, 1), jnp.int32))["params"]
        if base == "nf4":
            params = lj.quantize(params, "nf4", targets=TARGETS)
        return lj.lorafy(params, rank=rank, alpha=2.0 * rank, targets=TARGETS,
                         dtype=jnp.float32)

    params = jax.eval_shape(init, jax.random.key(0))
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    specs = lj.lora_specs(params, lj.fsdp_specs(params, mesh), mesh)
    step = lj.make_train_step(lj.cross_entropy_loss(lj.lora(model.apply)), optax.adamw(1e-4),
                              mesh, specs, P(("data", "fsdp")))
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    return step, step.abstract(params, {"input_ids": ids, "labels": ids}), params, cfg


def analyze_step(base: str, cfg_kwargs: dict = CONFIG, batch: int = 1, seq: int = 512,
                 rank: int = 16, remat: bool = True) -> dict:
    """Compile the LoRA grad step over a ``base`` ("fp32", "bf16", "nf4") base and walk it."""
    if base not in BASES:
        raise ValueError(f"base must be one of {BASES}, got {base!r}")
    t0 = time.perf_counter()
    step, args, params, cfg = build(cfg_kwargs, base, batch, seq, rank, remat)
    compiled = step.lower(*args).compile()
    ma = compiled.memory_analysis()
    frozen = Counter()
    for x in jax.tree.leaves(lj.split(params)[1]):
        frozen[str(x.dtype)] += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    sc = shape_classes(params, cfg, batch, seq)
    return {"base": base, "compile_s": round(time.perf_counter() - t0, 1),
            "ambiguous_classes": sc["ambiguous"],
            "temp_bytes": None if ma is None else int(ma.temp_size_in_bytes),
            "argument_bytes": None if ma is None else int(ma.argument_size_in_bytes),
            "frozen_bytes": dict(frozen),
            **analyze_hlo(compiled.as_text(), sc)}


# ----------------------------------------------------------------------------- main

def summary(r: dict) -> dict:
    """One row of the table: MiB and the dtypes of the weight matmuls."""
    mib = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
    up = r["bytes"].get("materialized", {}).get("bf16->f32", {})
    return {"base": r["base"], "ambiguous_classes": r["ambiguous_classes"],
            "temp_MiB": mib(r["temp_bytes"]),
            "frozen_MiB": mib(sum(r["frozen_bytes"].values())),
            "whole_weight_f32_copies_MiB": mib(r["whole_weight_upcasts"]["bytes"]),
            "materialized_upcasts_MiB": {k: mib(v) for k, v in sorted(up.items())},
            "weight_matmuls": sorted({f"{m['lhs']} x {m['rhs']} -> {m['out']}"
                                      for m in r["matmuls"] if m["class"] == "weight"})}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-remat", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "bf16_temporaries.json"))
    args = ap.parse_args(argv)
    cfg = {**CONFIG, "num_hidden_layers": args.layers}
    setup = {"config": cfg, "batch": args.batch, "seq": args.seq, "rank": args.rank,
             "remat": not args.no_remat, "targets": TARGETS}
    rows = []
    for base in BASES:
        rows.append(analyze_step(base, cfg, args.batch, args.seq, args.rank, not args.no_remat))
        print(summary(rows[-1]), flush=True)
    # One file holds a run per backend and JAX version of the same setup, side by side.
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    runs = old.get("runs", {}) if old.get("setup") == json.loads(json.dumps(setup)) else {}
    m = machine()
    runs[f"{m['backend']}, jax {m['jax']}"] = {
        "machine": m, "table": [summary(r) for r in rows], "rows": rows}
    doc = {"setup": setup, "notes": __doc__.split("\n\n", 2)[2].rsplit("\n\n", 1)[0].strip(),
           "runs": runs}
    print(f"wrote {repo_relative(write_json(out, doc))} (runs: {', '.join(runs)})")
    return doc


if __name__ == "__main__":
    main()
