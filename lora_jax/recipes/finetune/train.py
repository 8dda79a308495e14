"""The fine-tuning job end to end: load, adapt (QLoRA / LoRA / full), train, score, save.

:func:`finetune` runs one :class:`~lora_jax.recipes.finetune.config.FinetuneConfig` and
returns the summary it writes to ``out/summary.json`` (see
:mod:`lora_jax.recipes.finetune.report`). It trains with :func:`lora_jax.make_train_step`
on a mesh over every device (``--mesh``), so the same call uses one CPU or a GPU/TPU
host. The loss covers the answer tokens only; the train rows share a chat-template
prefix that runs once per batch (:func:`~lora_jax.recipes.finetune.scoring.make_logits_at`).
Checkpoints, resume and signals: :mod:`~lora_jax.recipes.finetune.loop`,
:mod:`~lora_jax.recipes.finetune.outputs`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from lora_jax.checkpoint import restore_adapter
from lora_jax.lora import combine, count_params, lora, split
from lora_jax.recipes.finetune.config import (
    RUN_FILE,
    FinetuneConfig,
    check_config,
    parse_mesh,
    read_run_config,
    write_run_config,
)
from lora_jax.recipes.finetune.data import (
    Encoded,
    common_prefix_len,
    encode_rows,
    prompt_ids,
    tokenize_examples,
)
from lora_jax.recipes.finetune.loop import DataOrder, Progress, run_steps
from lora_jax.recipes.finetune.outputs import (
    check_out,
    clear_outputs,
    latest_checkpoint,
    save_checkpoint,
    save_final,
    write_json,
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
from lora_jax.recipes.finetune.setup import adapt, load_base
from lora_jax.recipes.finetune.sources import load_examples
from lora_jax.scale import fsdp_specs, lora_specs, make_train_step

__all__ = ["TrainRows", "finetune", "make_mesh"]


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

    def batch(self, idx) -> dict:
        return {"ids": self.enc.ids[idx], "pos": self.pos[idx], "tgt": self.tgt[idx],
                "valid": self.valid[idx]}


def _encode_train(cfg: FinetuneConfig, tok, train, held) -> TrainRows:
    items = tokenize_examples(tok, train)
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    prefix_len = common_prefix_len(prompt_ids(it) for it in items + tokenize_examples(tok, held))
    if cfg.seq_len - prefix_len < 8:
        prefix_len = max(0, cfg.seq_len - 8)
    enc = encode_rows(items, cfg.seq_len, prefix_len=prefix_len, pad_id=pad_id)
    pos, valid = answer_positions(enc.loss_mask)
    tgt = np.take_along_axis(enc.ids, np.minimum(pos + 1, enc.ids.shape[1] - 1), axis=1)
    return TrainRows(enc, pos, valid, tgt, prefix_len)


def _optimizer(cfg: FinetuneConfig):
    """AdamW, linear warmup then cosine decay to 5% of ``lr``, gradients clipped at norm 1."""
    warmup = max(1, min(cfg.warmup, cfg.steps // 5))
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(cfg.steps, warmup + 1),
                                               end_value=cfg.lr * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(sched, weight_decay=cfg.weight_decay))


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


def _evaluate(scorer, params, log, label: str, *, skip: bool = False):
    """``(scores, seconds)``; logs the accuracy."""
    t0 = time.perf_counter()
    if skip or scorer is None:
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


def make_mesh(spec: str | None, batch: int) -> Mesh:
    """The ``(data, fsdp, tensor)`` mesh ``spec`` names (``"data=2,fsdp=4"``), on the first
    devices; default: FSDP over a host's devices, data-parallel across hosts, using as
    many devices as divide ``batch``."""
    devices = jax.devices()
    if spec is None:
        n = math.gcd(len(devices), batch)
        fsdp = math.gcd(n, jax.local_device_count())
        sizes = {"data": n // fsdp, "fsdp": fsdp}
    else:
        sizes = parse_mesh(spec)
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, **sizes}
    n = math.prod(sizes.values())
    if n > len(devices):
        raise ValueError(f"--mesh {spec} needs {n} devices; {len(devices)} are available")
    if batch % (sizes["data"] * sizes["fsdp"]):
        raise ValueError(f"--batch {batch} does not split over the mesh's data x fsdp = "
                         f"{sizes['data'] * sizes['fsdp']} devices; pass a multiple of it")
    return Mesh(np.array(devices[:n]).reshape(tuple(sizes.values())), tuple(sizes))


def _loss_fn(f):
    def loss_fn(params, b):
        nll = optax.softmax_cross_entropy_with_integer_labels(f(params, b["ids"], b["pos"]),
                                                              b["tgt"])
        return jnp.sum(nll * b["valid"]) / jnp.maximum(jnp.sum(b["valid"]), 1.0)
    return loss_fn


def _resume_check(cfg: FinetuneConfig, out: Path) -> None:
    """Refuse to resume with settings that change the computation."""
    rec = read_run_config(out)
    same = ("model", "data", "rank", "alpha", "targets", "quant", "steps", "lr", "warmup",
            "batch", "seq_len", "eval_size", "seed", "split_seed", "weight_decay")
    diff = [f"{k}={getattr(cfg, k)!r} (the run has {getattr(rec, k)!r})" for k in same
            if getattr(cfg, k) != getattr(rec, k)]
    if diff:
        raise ValueError(f"--resume: settings differ from the run in {out}: {', '.join(diff)}; "
                         f"resume with the run's settings (see {out / RUN_FILE})")


def _start(cfg, ts, params, out: Path, log):
    """``(trainable, frozen, opt_state)`` on the mesh and the progress so far."""
    trainable, frozen, opt_state = ts.init(params)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is None:
        if cfg.resume:
            log(f"resume: no checkpoint in {out} yet; starting at step 0")
        return (trainable, frozen, opt_state), Progress()
    step, st = ckpt
    if step >= cfg.steps:
        raise ValueError(f"--resume: the run in {out} is complete ({step} of {cfg.steps} "
                         f"steps); use `lora-jax eval` / `generate` on it, or --overwrite")
    params, opt_state = restore_adapter(out / "adapter", combine(trainable, frozen),
                                        opt_state=opt_state, step=step)
    trainable, frozen = split(params)
    log(f"resume: continuing from the checkpoint at step {step}")
    return (trainable, frozen, opt_state), Progress(step, list(st["losses"]), list(st["evals"]))


def _checkpointer(cfg, out: Path, full: bool):
    def checkpoint(state, prog: Progress, *, final: bool = False):
        """The last step's adapter is what users keep: it goes without optimizer state."""
        if full or not cfg.save:
            return None
        tr, fr, opt = state
        save_checkpoint(out, combine(tr, fr), None if final else opt, step=prog.step,
                        state=prog.state(cfg.batch, cfg.seed))
        return prog.step
    return checkpoint


def _prepare(cfg: FinetuneConfig, log):
    """Load the base and the data, adapt; ``(base, params, rows, train, held, names)``."""
    base = load_base(cfg)
    n_base = sum(int(x.size) for x in jax.tree.leaves(base.params))
    data_name, n_unique, train, held = load_examples(
        cfg.data, cfg.eval_size, seed=cfg.seed if cfg.split_seed is None else cfg.split_seed)
    rows = _encode_train(cfg, base.tokenizer, train, held)
    log(f"data: {data_name}: {n_unique} unique examples -> {len(train)} train / {len(held)} "
        f"held-out {rows.describe(cfg.seq_len)}")
    params = adapt(cfg, base.params)
    return base, n_base, params, rows, train, held, {"data": data_name, "unique": n_unique}


def finetune(cfg: FinetuneConfig, *, log=print) -> dict:
    """Run the whole job; returns the summary dict (also written to ``out/summary.json``).

    Raises ``ValueError`` for bad settings or data before anything is written,
    :class:`~lora_jax.recipes.finetune.loop.Interrupted` after saving a checkpoint on
    SIGINT / SIGTERM.
    """
    t_start = time.perf_counter()
    check_config(cfg)
    if cfg.rank == 0 and (cfg.resume or cfg.save_every):
        raise ValueError("--resume and --save-every need LoRA (--rank >= 1): full "
                         "fine-tuning saves the model at the end only")
    out = check_out(cfg)
    if cfg.resume:
        _resume_check(cfg, out)
    mesh = make_mesh(cfg.mesh, cfg.batch)
    base, n_base, params, rows, train, held, names = _prepare(cfg, log)
    if not cfg.resume:
        clear_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        write_run_config(cfg, out)
    full = cfg.rank == 0
    f = make_logits_at(base.model, rows.enc.prefix)
    f = f if full else lora(f)
    eval_logp = jax.jit(lambda p, ids, pos: jax.nn.log_softmax(f(p, ids, pos), axis=-1))
    scorer = Scorer(base.tokenizer, held, cfg.seq_len, eval_logp,
                    min(cfg.eval_batch, max(1, len(held))), prefix_len=rows.prefix_len) \
        if held else None
    tx = _optimizer(cfg)
    specs = fsdp_specs(params, mesh)
    ts = make_train_step(_loss_fn(f), tx, mesh, specs if full else lora_specs(params, specs, mesh),
                         trainable="all" if full else "lora")
    state, prog = _start(cfg, ts, params, out, log)
    sizes = _sizes(params, state[1], state[2], n_base, full)
    del params
    merged = (lambda s: s[0]) if full else (lambda s: combine(s[0], s[1]))
    if prog.step == 0:
        before, t_eval0 = _evaluate(scorer, merged(state), log, "before",
                                    skip=not cfg.eval_before)
        prog.evals = [{"step": 0, **before}]
    else:   # resumed: the first run measured it
        before, t_eval0 = prog.evals[0], 0.0
    steps_run = cfg.steps - prog.step
    order = DataOrder([e.get("completion") for e in train], cfg.batch, cfg.seed)
    state, timing = run_steps(
        cfg, ts, state, lambda k: ts.shard_batch(rows.batch(order(k))), prog,
        tokens=lambda k: int(rows.real_tokens[order(k)].sum()),
        evaluate=lambda s: scorer(merged(s)) if scorer else None,
        checkpoint=_checkpointer(cfg, out, full), log=log)
    params = merged(state)
    after, t_eval1 = _evaluate(scorer, params, log, "after")
    outputs = {}
    if cfg.save:
        _checkpointer(cfg, out, full)(state, prog, final=True)
        outputs = save_final(cfg, out, params, base.name)
    sizes["ckpt_bytes"] = dir_bytes(outputs["adapter"]) if "adapter" in outputs else None
    sizes["peft_bytes"] = dir_bytes(outputs["peft"]) if "peft" in outputs else None
    png = out / "loss.png"
    cfg = _plot(cfg, log, prog.losses, png, base.name, before, after)
    timing.update(eval_s=[t_eval0, t_eval1], wall_s=time.perf_counter() - t_start,
                  steps_run=steps_run)
    summary = summarize(
        cfg, source={"base_model": base.name, "model_path": str(base.path)},
        task={"data": names["data"], "unique_examples": names["unique"],
              "train_examples": len(train), "heldout_examples": len(held),
              "heldout_truncated": scorer.truncated if scorer else 0,
              "shared_prefix_tokens": int(rows.prefix_len)},
        before=before, after=after, losses=prog.losses, sizes=sizes, timing=timing,
        outputs={**{k: str(v) for k, v in outputs.items()},
                 "loss_png": str(png) if cfg.plot else None},
        evals=prog.evals[1:], mesh=dict(mesh.shape))
    write_json(out / "summary.json", summary)
    log(format_table(summary))
    return summary
