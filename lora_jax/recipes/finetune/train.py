"""The fine-tuning job end to end: load, adapt (QLoRA / LoRA / full), train, score, save.

:func:`finetune` runs one :class:`~lora_jax.recipes.finetune.config.FinetuneConfig` and
returns the summary it writes to ``out/summary.json`` (see
:mod:`lora_jax.recipes.finetune.report`). The loss covers the answer tokens only; the
train rows share a chat-template prefix that runs once per batch
(:func:`~lora_jax.recipes.finetune.scoring.make_logits_at`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_jax.checkpoint import save_adapter
from lora_jax.interop import to_peft
from lora_jax.lora import combine, count_params, lora, lorafy, split
from lora_jax.models import default_model_path, from_pretrained, load_tokenizer
from lora_jax.quant import quantize
from lora_jax.recipes.finetune.config import SMOLLM2_HF_NAME, FinetuneConfig
from lora_jax.recipes.finetune.data import (
    Encoded,
    common_prefix_len,
    encode_rows,
    load_examples,
    tokenize_examples,
)
from lora_jax.recipes.finetune.report import (
    dir_bytes,
    fmt_acc,
    format_table,
    plot_losses,
    summarize,
    tree_bytes,
)
from lora_jax.recipes.finetune.scoring import Scorer, answer_positions, make_logits_at

__all__ = ["QUANT_KINDS", "TrainRows", "finetune"]

QUANT_KINDS = ("none", "nf4", "int4", "fp4")


@dataclasses.dataclass
class TrainRows:
    """The training set as fixed-length rows, read by the loss at the answer positions."""

    enc: Encoded          # shared prefix + right-padded rows
    pos: np.ndarray       # [N, K] positions whose logits predict an answer token
    valid: np.ndarray     # [N, K] 1 where ``pos`` is a real answer position
    tgt: np.ndarray       # [N, K] the answer tokens predicted there
    prefix_len: int

    @property
    def real_tokens(self) -> np.ndarray:
        """Tokens per row, shared prefix included and padding excluded (for tokens/s)."""
        return self.prefix_len + (self.pos * self.valid).max(1).astype(np.int64) + 2

    def describe(self, seq_len: int) -> str:
        p = self.prefix_len
        return (f"(seq_len {seq_len} = shared prefix {p} + {seq_len - p}; "
                f"{self.enc.truncated} train prompts truncated)")


def _encode_train(cfg: FinetuneConfig, tok, train, held) -> TrainRows:
    items = tokenize_examples(tok, train)
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    prefix_len = common_prefix_len([p for p, _ in items] +
                                   [p for p, _ in tokenize_examples(tok, held)])
    if cfg.seq_len - prefix_len < 8:
        prefix_len = max(0, cfg.seq_len - 8)
    enc = encode_rows(items, cfg.seq_len, prefix_len=prefix_len, pad_id=pad_id)
    pos, valid = answer_positions(enc.loss_mask)
    tgt = np.take_along_axis(enc.ids, np.minimum(pos + 1, enc.ids.shape[1] - 1), axis=1)
    return TrainRows(enc, pos, valid, tgt, prefix_len)


def _adapt(cfg: FinetuneConfig, base):
    """The tree that trains: ``base`` itself (rank 0), else LoRA on the (quantized) base."""
    if cfg.rank == 0:
        if cfg.quant != "none":
            raise ValueError("full fine-tuning (rank 0) needs --quant none")
        return base
    params = base
    if cfg.quant != "none":
        params = jax.jit(lambda p: quantize(p, cfg.quant, targets=cfg.targets))(params)
    return lorafy(params, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                  key=jax.random.key(cfg.seed))


def _optimizer(cfg: FinetuneConfig):
    """AdamW, linear warmup then cosine decay to 5% of ``lr``, gradients clipped at norm 1."""
    warmup = max(1, min(cfg.warmup, cfg.steps // 5))
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                               end_value=cfg.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(sched, weight_decay=cfg.weight_decay))


def _make_step(f, tx, full: bool):
    """The jitted step ``(trainable, frozen, opt_state, ids, pos, tgt, valid) -> (.., loss)``."""
    def loss_fn(tr, fr, ids, pos, tgt, valid):
        p = tr if full else combine(tr, fr)
        nll = optax.softmax_cross_entropy_with_integer_labels(f(p, ids, pos), tgt)
        return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)

    @jax.jit
    def step(tr, fr, opt_state, ids, pos, tgt, valid):
        loss, g = jax.value_and_grad(loss_fn)(tr, fr, ids, pos, tgt, valid)
        with jax.numpy_dtype_promotion("standard"):   # optax mixes python floats into updates
            updates, opt_state = tx.update(g, opt_state, tr)
            tr = optax.apply_updates(tr, updates)
        return tr, opt_state, loss

    return step


def _epoch_order(rng, train, batch):
    """A shuffled epoch, interleaved by class when the task is a classification
    (balanced batches)."""
    classes = sorted({e["completion"] for e in train})
    if not (2 <= len(classes) <= 16):
        return rng.permutation(len(train))
    by = [rng.permutation([i for i, e in enumerate(train) if e["completion"] == c])
          for c in classes]
    n = min(len(b) for b in by)
    return np.stack([b[:n] for b in by], 1).reshape(-1)   # c0, c1, c0, c1, ...


def _progress_bar(cfg: FinetuneConfig):
    try:
        from tqdm.auto import tqdm  # an optional extra
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=cfg.steps, desc="finetune", disable=not cfg.progress, dynamic_ncols=True,
                file=sys.stderr)


def _train(cfg: FinetuneConfig, step, state, rows: TrainRows, train):
    """``cfg.steps`` steps over class-balanced epochs; returns (state, losses, timing)."""
    trainable, frozen, opt_state = state
    rng = np.random.default_rng(cfg.seed)
    order = _epoch_order(rng, train, cfg.batch)
    n_real = rows.real_tokens
    losses, seen_tokens, t_first = [], 0, None
    bar = _progress_bar(cfg)
    t_train = time.perf_counter()
    for _ in range(cfg.steps):
        if len(order) < cfg.batch:
            order = np.concatenate([order, _epoch_order(rng, train, cfg.batch)])
        idx, order = order[: cfg.batch], order[cfg.batch:]
        trainable, opt_state, loss = step(trainable, frozen, opt_state, rows.enc.ids[idx],
                                          rows.pos[idx], rows.tgt[idx], rows.valid[idx])
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
    timing = {"train_s": time.perf_counter() - t_train, "first_s": t_first,
              "seen_tokens": seen_tokens,
              "steady": (time.perf_counter() - t_after_first) if cfg.steps > 1 else float("nan")}
    return (trainable, frozen, opt_state), losses, timing


def _save(cfg: FinetuneConfig, out: Path, params, base_name: str, data_name: str):
    """The orbax adapter and the PEFT export; returns their bytes on disk (None: not saved)."""
    if not cfg.save or cfg.rank == 0:
        return None, None
    adapter_dir = out / "adapter"
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    save_adapter(adapter_dir, params, step=cfg.steps,
                 metadata={"base_model": base_name, "task": data_name, "rank": cfg.rank,
                           "alpha": cfg.alpha, "quant": cfg.quant, "seed": cfg.seed})
    to_peft(params, out / "peft", base_model_name_or_path=base_name)
    return dir_bytes(adapter_dir), dir_bytes(out / "peft")


def _plot(cfg: FinetuneConfig, log, losses, png: Path, base_name, before, after):
    """Writes ``loss.png`` unless matplotlib is missing; returns ``cfg`` with ``plot`` as done."""
    if not cfg.plot:
        return cfg
    try:
        import matplotlib  # noqa: F401  (an optional extra)
    except ImportError:
        log("matplotlib is not installed (pip install 'lora-jax[experiments]'): no loss.png")
        return dataclasses.replace(cfg, plot=False)
    plot_losses(losses, png, title=f"{Path(base_name).name}: "
                f"{'full FT' if cfg.rank == 0 else f'LoRA r={cfg.rank}'}, base {cfg.quant}, "
                f"acc {fmt_acc(before['accuracy'])} -> {fmt_acc(after['accuracy'])}")
    return cfg


def _load(cfg: FinetuneConfig):
    """``(model, base params, tokenizer, model path, base model name)``."""
    if cfg.model is None:
        model_path, base_name = default_model_path(), SMOLLM2_HF_NAME
    else:
        model_path, base_name = Path(cfg.model), str(cfg.model)
    model, base = from_pretrained(model_path, dtype=jnp.float32, remat=cfg.remat)
    return model, base, load_tokenizer(model_path), model_path, base_name


def _evaluate(scorer, params, log, label: str, *, skip: bool = False):
    """``(scores, seconds)``; logs the accuracy."""
    t0 = time.perf_counter()
    if skip:
        return {"accuracy": None, "scoring": "not measured"}, time.perf_counter() - t0
    res = scorer(params)
    dt = time.perf_counter() - t0
    note = f"({dt:.1f}s, {res['scoring']})" if label == "before" else f"({dt:.1f}s)"
    log(f"held-out accuracy {label + ':':7} {res['accuracy']:.3f} {res.get('predicted', '')} "
        f"{note}")
    return res, dt


def _sizes(params, frozen, opt_state, n_base: int, full: bool) -> dict:
    """Parameter counts and the bytes of the optimizer state and the stored base."""
    counts = ({"trainable": n_base, "frozen": 0, "total": n_base, "trainable_fraction": 1.0}
              if full else count_params(params))
    return {"n_base": n_base, "opt_bytes": tree_bytes(opt_state), "counts": counts,
            "base_stored_bytes": 4 * n_base if full else tree_bytes(frozen)}


def finetune(cfg: FinetuneConfig, *, log=print) -> dict:
    """Run the whole job; returns the summary dict (also written to ``out/summary.json``)."""
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.quant not in QUANT_KINDS:
        raise ValueError(f"--quant must be none, nf4, int4 or fp4; got {cfg.quant!r}")
    model, base, tok, model_path, base_name = _load(cfg)
    n_base = sum(int(x.size) for x in jax.tree.leaves(base))
    data_name, n_unique, train, held = load_examples(
        cfg.data, cfg.eval_size, seed=cfg.seed if cfg.split_seed is None else cfg.split_seed)
    rows = _encode_train(cfg, tok, train, held)
    log(f"data: {data_name}: {n_unique} unique examples -> {len(train)} train / {len(held)} "
        f"held-out {rows.describe(cfg.seq_len)}")
    full = cfg.rank == 0
    params = _adapt(cfg, base)
    del base
    f = make_logits_at(model, rows.enc.prefix)
    f = f if full else lora(f)
    eval_logp = jax.jit(lambda p, ids, pos: jax.nn.log_softmax(f(p, ids, pos), axis=-1))
    scorer = Scorer(tok, held, cfg.seq_len, eval_logp, min(cfg.eval_batch, max(1, len(held))),
                    prefix_len=rows.prefix_len)
    tx = _optimizer(cfg)
    trainable, frozen = (params, jax.tree.map(lambda _: None, params)) if full else split(params)
    with jax.numpy_dtype_promotion("standard"):
        opt_state = tx.init(trainable)
    sizes = _sizes(params, frozen, opt_state, n_base, full)
    before, t_eval0 = _evaluate(scorer, params, log, "before", skip=not cfg.eval_before)
    (trainable, frozen, _), losses, timing = _train(
        cfg, _make_step(f, tx, full), (trainable, frozen, opt_state), rows, train)
    params = trainable if full else combine(trainable, frozen)
    after, t_eval1 = _evaluate(scorer, params, log, "after")
    sizes["ckpt_bytes"], sizes["peft_bytes"] = _save(cfg, out, params, base_name, data_name)
    png = out / "loss.png"
    cfg = _plot(cfg, log, losses, png, base_name, before, after)
    timing.update(eval_s=[t_eval0, t_eval1], wall_s=time.perf_counter() - t_start)
    summary = summarize(
        cfg, source={"base_model": base_name, "model_path": str(model_path)},
        task={"data": data_name, "unique_examples": n_unique, "train_examples": len(train),
              "heldout_examples": len(held), "heldout_truncated": scorer.truncated,
              "shared_prefix_tokens": int(rows.prefix_len)},
        before=before, after=after, losses=losses, sizes=sizes, timing=timing,
        outputs={"adapter": str(out / "adapter") if sizes["ckpt_bytes"] else None,
                 "peft": str(out / "peft") if sizes["peft_bytes"] else None,
                 "loss_png": str(png) if cfg.plot else None})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log(format_table(summary))
    return summary
