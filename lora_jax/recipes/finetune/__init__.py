"""The ``lora-jax finetune`` recipe: (Q)LoRA-fine-tune a Llama on an instruction task.

:class:`FinetuneConfig` holds the settings, :func:`finetune` runs the job (load, adapt,
train, score, save; :mod:`~lora_jax.recipes.finetune.train`); the data, the answer-only
scoring and the report live in their own modules.
"""

from lora_jax.recipes.finetune.config import DEFAULT_TARGETS
from lora_jax.recipes.finetune.config import SMOLLM2_HF_NAME
from lora_jax.recipes.finetune.config import INIT_KINDS
from lora_jax.recipes.finetune.config import QUANT_KINDS
from lora_jax.recipes.finetune.config import RUN_FILE
from lora_jax.recipes.finetune.config import FinetuneConfig
from lora_jax.recipes.finetune.config import check_config
from lora_jax.recipes.finetune.config import parse_mesh
from lora_jax.recipes.finetune.config import read_run_config
from lora_jax.recipes.finetune.config import write_run_config
from lora_jax.recipes.finetune.data import Encoded
from lora_jax.recipes.finetune.evaluate import evaluate_run
from lora_jax.recipes.finetune.evaluate import exact_match
from lora_jax.recipes.finetune.evaluate import heldout_loss
from lora_jax.recipes.finetune.export import export_run
from lora_jax.recipes.finetune.generate import TextStream
from lora_jax.recipes.finetune.generate import check_generate_flags
from lora_jax.recipes.finetune.generate import generate_text
from lora_jax.recipes.finetune.loop import Interrupted
from lora_jax.recipes.finetune.report import format_table
from lora_jax.recipes.finetune.runs import Run
from lora_jax.recipes.finetune.runs import load_run
from lora_jax.recipes.finetune.scoring import Scorer
from lora_jax.recipes.finetune.scoring import answer_positions
from lora_jax.recipes.finetune.scoring import make_logits_at
from lora_jax.recipes.finetune.setup import Base
from lora_jax.recipes.finetune.setup import adapt
from lora_jax.recipes.finetune.setup import load_base
from lora_jax.recipes.finetune.sources import load_examples
from lora_jax.recipes.finetune.train import finetune

__all__ = (
    "Base",
    "DEFAULT_TARGETS",
    "Encoded",
    "FinetuneConfig",
    "Interrupted",
    "INIT_KINDS",
    "QUANT_KINDS",
    "RUN_FILE",
    "Run",
    "SMOLLM2_HF_NAME",
    "Scorer",
    "TextStream",
    "adapt",
    "answer_positions",
    "check_config",
    "check_generate_flags",
    "evaluate_run",
    "exact_match",
    "export_run",
    "finetune",
    "format_table",
    "generate_text",
    "heldout_loss",
    "load_base",
    "load_examples",
    "load_run",
    "make_logits_at",
    "parse_mesh",
    "read_run_config",
    "write_run_config",
)
