"""The main job: QLoRA-fine-tune SmolLM2-135M-Instruct on rotten-tomatoes sentiment.

    python -m experiments.finetune            # same flags as `lora-jax finetune`

Same as ``lora-jax finetune`` (flags: ``lora_jax/cli.py``, the job:
``lora_jax/recipes/finetune/``); additionally copies the run's
summary and loss curve to experiments/results/finetune.json and finetune_loss.png.
"""

import json
import shutil
import sys
from pathlib import Path

from lora_jax.cli import build_parser, config_from_args
from lora_jax.recipes import reexec_with_malloc_tunables
from lora_jax.recipes.finetune import finetune

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None):
    ns = build_parser().parse_args(["finetune", *(sys.argv[1:] if argv is None else argv)])
    summary = finetune(config_from_args(ns))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps(summary, indent=2))
    png = summary["outputs"]["loss_png"]
    if png:
        shutil.copyfile(png, RESULTS / "finetune_loss.png")
    return 0


if __name__ == "__main__":
    reexec_with_malloc_tunables()
    sys.exit(main())
