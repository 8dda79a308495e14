"""The settings of one ``lora-jax finetune`` run (every CLI flag is a field here).

:func:`check_config` validates every field before anything touches the disk; ``run.json``
(:func:`write_run_config` / :func:`read_run_config`) records them in the output directory,
which is how ``--resume``, ``generate``, ``export`` and ``eval`` rebuild the run.

Example:
    >>> cfg = FinetuneConfig(rank=16, steps=200)
    >>> cfg.quant, cfg.alpha, cfg.out
    ('nf4', 16.0, 'runs/finetune')
    >>> check_config(FinetuneConfig(steps=0))
    Traceback (most recent call last):
    ...
    ValueError: --steps must be an integer >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

__all__ = ["DEFAULT_TARGETS", "INIT_KINDS", "QUANT_KINDS", "RUN_FILE", "SMOLLM2_HF_NAME",
           "FinetuneConfig", "check_config", "parse_mesh", "read_run_config", "write_run_config"]

#: the attention and MLP projections of the reference Llama
DEFAULT_TARGETS = r"layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel"
#: the HF name of the embedded default model (recorded as the PEFT export's base model)
SMOLLM2_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUANT_KINDS = ("none", "nf4", "int4", "fp4")
#: A/B initialisations: PEFT's default (B = 0) or LoftQ (against the quantization error)
INIT_KINDS = ("default", "loftq")
#: the file in a run's output directory that records its config
RUN_FILE = "run.json"


@dataclasses.dataclass
class FinetuneConfig:
    model: str | None = None          # HF dir or .gguf; None = embedded SmolLM2-135M-Instruct
    data: str | None = None           # jsonl / csv; None = rotten tomatoes
    rank: int = 8                     # 0 = full fine-tuning (every parameter trains)
    alpha: float | None = 16.0
    targets: str = DEFAULT_TARGETS
    quant: str = "nf4"                # none | nf4 | int4 | fp4
    init: str = "default"             # default (B = 0) | loftq (needs a quantized base)
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
    save_every: int = 0               # checkpoint every N steps (0: only at the end)
    eval_every: int = 0               # held-out evaluation every N steps (0: before/after only)
    mesh: str | None = None           # "data=2,fsdp=4"; None: data x fsdp over local devices
    resume: bool = False              # continue the run in ``out``
    overwrite: bool = False           # replace a previous run in ``out``


def _int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"--{name} must be an integer >= {lo}, got {v!r}")


def _positive(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"--{name} must be a finite number > 0, got {v!r}")


def parse_mesh(spec: str) -> dict[str, int]:
    """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (axes among data, fsdp, tensor)."""
    axes = {}
    for part in spec.split(","):
        name, _, size = part.strip().partition("=")
        if name not in ("data", "fsdp", "tensor") or not size.isdigit() or int(size) < 1 \
                or name in axes:
            raise ValueError(f"--mesh must look like 'data=2,fsdp=4' (axes data, fsdp, tensor, "
                             f"each once, sizes >= 1), got {spec!r}")
        axes[name] = int(size)
    return axes


def check_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """Raise ``ValueError`` naming the flag of the first bad setting; return ``cfg``."""
    for name in ("steps", "batch", "eval_batch"):
        _int(name.replace("_", "-"), getattr(cfg, name), 1)
    for name in ("rank", "warmup", "eval_size", "seed", "save_every", "eval_every"):
        _int(name.replace("_", "-"), getattr(cfg, name), 0)
    _int("seq-len", cfg.seq_len, 16)
    _positive("lr", cfg.lr)
    if cfg.alpha is not None:
        _positive("alpha", cfg.alpha)
    if not math.isfinite(cfg.weight_decay) or cfg.weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {cfg.weight_decay!r}")
    if cfg.quant not in QUANT_KINDS:
        raise ValueError(f"--quant must be one of {', '.join(QUANT_KINDS)}; got {cfg.quant!r}")
    if cfg.init not in INIT_KINDS:
        raise ValueError(f"--init must be one of {', '.join(INIT_KINDS)}; got {cfg.init!r}")
    if cfg.init == "loftq" and (cfg.quant == "none" or cfg.rank == 0):
        raise ValueError("--init loftq fits A/B to the quantization error of the base, so it "
                         "needs --quant nf4, int4 or fp4 and --rank >= 1")
    if cfg.rank == 0 and cfg.quant != "none":
        raise ValueError("--rank 0 (full fine-tuning) needs --quant none: a quantized base "
                         "cannot be trained")
    try:
        re.compile(cfg.targets)
    except re.error as e:
        raise ValueError(f"--targets is not a valid regular expression ({e}): "
                         f"{cfg.targets!r}") from None
    for flag, path in (("model", cfg.model), ("data", cfg.data)):
        if path is not None and not os.path.exists(path):
            raise ValueError(f"--{flag} {path}: no such file or directory")
    if cfg.mesh is not None:
        parse_mesh(cfg.mesh)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it; "
                         "pass one of them")
    return cfg


def write_run_config(cfg: FinetuneConfig, out: Path) -> None:
    """``out/run.json``, written atomically (a temp file, then a rename)."""
    tmp = out / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"config": dataclasses.asdict(cfg)}, indent=2))
    os.replace(tmp, out / RUN_FILE)


def read_run_config(run_dir) -> FinetuneConfig:
    """The config recorded in ``run_dir/run.json``; ``ValueError`` naming the file if absent
    or malformed."""
    f = Path(run_dir) / RUN_FILE
    try:
        raw = json.loads(f.read_text())["config"]
        fields = {fl.name for fl in dataclasses.fields(FinetuneConfig)}
        return FinetuneConfig(**{k: v for k, v in raw.items() if k in fields})
    except FileNotFoundError:
        raise ValueError(f"{run_dir} is not a lora-jax finetune run (no {RUN_FILE}); pass the "
                         f"--out directory of a finetune run") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: not a valid run config ({e})") from None
