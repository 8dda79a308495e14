"""LoraWeight, its rules, lorafy/merge, layouts, and the train/frozen split."""

from lora_jax.core import MaterializationError
from lora_jax.core import MaterializationWarning
from lora_jax.lora.factors import RankWarning
from lora_jax.lora.infer import infer_layout
from lora_jax.lora.infer import layouts_for
from lora_jax.lora.infer import weight_usage
from lora_jax.lora.layout import LayoutSpec
from lora_jax.lora.layout import default_layout
from lora_jax.lora.layout import normalize as normalize_layout
from lora_jax.lora.layout import resolve_layout
from lora_jax.lora.lorafy import lorafy
from lora_jax.lora.lorafy import merge
from lora_jax.lora.rules import dot_rule, scalar_operand, transpose_rule
from lora_jax.lora.rules import is_row_lookup
from lora_jax.lora.train import combine
from lora_jax.lora.train import count_params
from lora_jax.lora.train import lora_optimizer
from lora_jax.lora.train import split
from lora_jax.lora.train import trainable_labels
from lora_jax.lora.train import trainable_mask
from lora_jax.lora.trainable import Trainable
from lora_jax.lora.trainable import mark_trainable
from lora_jax.lora.transform import lora
from lora_jax.lora.transform import register_dot_rule
from lora_jax.lora.weight import AdapterNode
from lora_jax.lora.weight import LoraWeight
from lora_jax.lora.weight import check_node
from lora_jax.lora.weight import factor_problem
from lora_jax.lora.weight import is_adapter
from lora_jax.lora.weight import lora_scale
from lora_jax.lora.weight import looks_like_factors

__all__ = (
    "AdapterNode",
    "LayoutSpec",
    "LoraWeight",
    "MaterializationError",
    "MaterializationWarning",
    "RankWarning",
    "Trainable",
    "check_node",
    "combine",
    "count_params",
    "default_layout",
    "dot_rule",
    "is_row_lookup",
    "factor_problem",
    "infer_layout",
    "is_adapter",
    "layouts_for",
    "lora",
    "lora_optimizer",
    "lora_scale",
    "looks_like_factors",
    "lorafy",
    "mark_trainable",
    "merge",
    "normalize_layout",
    "register_dot_rule",
    "resolve_layout",
    "scalar_operand",
    "split",
    "trainable_labels",
    "trainable_mask",
    "transpose_rule",
    "weight_usage",
)
