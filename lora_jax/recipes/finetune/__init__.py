"""The ``lora-jax finetune`` recipe: (Q)LoRA-fine-tune a Llama on an instruction task.

:class:`FinetuneConfig` holds the settings, :func:`finetune` runs the job (load, adapt,
train, score, save; :mod:`~lora_jax.recipes.finetune.train`); the data, the answer-only
scoring and the report live in their own modules.
"""

from lora_jax.recipes.finetune.config import DEFAULT_TARGETS
from lora_jax.recipes.finetune.config import SMOLLM2_HF_NAME
from lora_jax.recipes.finetune.config import FinetuneConfig
from lora_jax.recipes.finetune.data import Encoded
from lora_jax.recipes.finetune.data import load_examples
from lora_jax.recipes.finetune.report import format_table
from lora_jax.recipes.finetune.scoring import Scorer
from lora_jax.recipes.finetune.scoring import answer_positions
from lora_jax.recipes.finetune.scoring import make_logits_at
from lora_jax.recipes.finetune.train import QUANT_KINDS
from lora_jax.recipes.finetune.train import finetune

__all__ = (
    "DEFAULT_TARGETS",
    "Encoded",
    "FinetuneConfig",
    "QUANT_KINDS",
    "SMOLLM2_HF_NAME",
    "Scorer",
    "answer_positions",
    "finetune",
    "format_table",
    "load_examples",
    "make_logits_at",
)
