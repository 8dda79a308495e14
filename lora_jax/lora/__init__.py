"""LoraWeight, its rules, lorafy/merge, layouts, targets, and the train/frozen split."""

from lora_jax.lora.infer import infer_layout
from lora_jax.lora.layout import default_layout
from lora_jax.lora.lorafy import lorafy
from lora_jax.lora.lorafy import merge
from lora_jax.lora.weight import LoraWeight
from lora_jax.lora.train import combine
from lora_jax.lora.train import count_params
from lora_jax.lora.train import lora_optimizer
from lora_jax.lora.train import split
from lora_jax.lora.train import trainable_labels
from lora_jax.lora.train import trainable_mask
from lora_jax.lora.transform import MaterializationError
from lora_jax.lora.transform import MaterializationWarning
from lora_jax.lora.transform import lora
from lora_jax.lora.transform import register_dot_rule

__all__ = (
    "LoraWeight",
    "MaterializationError",
    "MaterializationWarning",
    "combine",
    "count_params",
    "default_layout",
    "infer_layout",
    "lora",
    "lora_optimizer",
    "lorafy",
    "merge",
    "register_dot_rule",
    "split",
    "trainable_labels",
    "trainable_mask",
)
