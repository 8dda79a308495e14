"""DoRA, PiSSA/OLoRA init, LoRA+, and many adapters on one base."""

from lora_jax.variants.dora import DoraWeight
from lora_jax.variants.dora import dorafy
from lora_jax.variants.dora import gram_norm
from lora_jax.variants.dora import to_dora
from lora_jax.variants.init import olora_init
from lora_jax.variants.init import pissa_init
from lora_jax.variants.init import pissa_to_lora
from lora_jax.variants.loftq import loftq_init
from lora_jax.variants.loraplus import loraplus_labels
from lora_jax.variants.loraplus import loraplus_optimizer
from lora_jax.variants import multi_rules as _multi_rules  # noqa: F401  (registers its rules)
from lora_jax.variants.multi import MultiDoraWeight
from lora_jax.variants.multi import MultiLoraWeight
from lora_jax.variants.multi import adapter_ids
from lora_jax.variants.multi import adapter_names
from lora_jax.variants.multi import unstack_adapter
from lora_jax.variants.multi import with_adapter_ids
from lora_jax.variants.stack import add_adapter
from lora_jax.variants.stack import remove_adapter
from lora_jax.variants.stack import set_adapter
from lora_jax.variants.stack import stack_adapters
from lora_jax.variants.weighted import add_weighted_adapter
from lora_jax.variants.weighted import safe_merge

__all__ = (
    "DoraWeight",
    "MultiDoraWeight",
    "MultiLoraWeight",
    "adapter_ids",
    "adapter_names",
    "add_adapter",
    "add_weighted_adapter",
    "dorafy",
    "gram_norm",
    "loftq_init",
    "loraplus_labels",
    "loraplus_optimizer",
    "olora_init",
    "pissa_init",
    "pissa_to_lora",
    "remove_adapter",
    "safe_merge",
    "set_adapter",
    "stack_adapters",
    "to_dora",
    "unstack_adapter",
    "with_adapter_ids",
)
