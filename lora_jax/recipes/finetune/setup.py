"""A run's model from its config: the base (HF dir, GGUF or the embedded SmolLM2) and the
tree that trains (quantized + lorafied, or the base itself for full fine-tuning).

``finetune`` builds its tree with these, and so do ``generate`` / ``export`` / ``eval``
when they rebuild a finished run from its ``run.json`` (the same config gives the same
tree, so a saved adapter restores into it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_jax.lora import lorafy
from lora_jax.models import default_model_path, from_pretrained, load_tokenizer
from lora_jax.quant import quantize
from lora_jax.recipes.finetune.config import SMOLLM2_HF_NAME, FinetuneConfig
from lora_jax.variants import loftq_init

__all__ = ["Base", "adapt", "load_base"]


class Base(NamedTuple):
    model: Any           # the flax module (LlamaForCausalLM)
    params: Any          # its fp32 parameters
    tokenizer: Any
    path: Path           # where the weights were read from
    name: str            # the HF name recorded in exports (the path when not the default)


def load_base(cfg: FinetuneConfig) -> Base:
    """The base model ``cfg.model`` names (``None``: the embedded SmolLM2-135M-Instruct)."""
    if cfg.model is None:
        path, name = default_model_path(), SMOLLM2_HF_NAME
    else:
        path, name = Path(cfg.model), str(cfg.model)
    model, params = from_pretrained(path, dtype=jnp.float32, remat=cfg.remat)
    return Base(model, params, load_tokenizer(path), path, name)


def adapt(cfg: FinetuneConfig, params):
    """The tree that trains: ``params`` itself (rank 0), else LoRA on the (quantized) base.

    ``init="loftq"`` quantizes the same way (kind, blocks of 64, double quant) but fits
    A/B to the quantization error (one LoftQ iteration, PEFT's default ``loftq_iter``), so
    ``deq(Q) + s*A@B`` starts closer to the pretrained weights than ``deq(Q)`` does."""
    if cfg.rank == 0:
        return params
    if cfg.init == "loftq":
        return loftq_init(params, cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                          kind=cfg.quant)
    if cfg.quant != "none":
        params = jax.jit(lambda p: quantize(p, cfg.quant, targets=cfg.targets))(params)
    return lorafy(params, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                  key=jax.random.key(cfg.seed))
