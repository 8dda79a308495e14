"""The settings of one ``lora-jax finetune`` run (every CLI flag is a field here).

Example:
    >>> cfg = FinetuneConfig(rank=16, steps=200)
    >>> cfg.quant, cfg.alpha, cfg.out
    ('nf4', 16.0, 'runs/finetune')
"""

from __future__ import annotations

import dataclasses

__all__ = ["DEFAULT_TARGETS", "SMOLLM2_HF_NAME", "FinetuneConfig"]

#: the attention and MLP projections of the reference Llama
DEFAULT_TARGETS = r"layers/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/kernel"
#: the HF name of the embedded default model (recorded as the PEFT export's base model)
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
