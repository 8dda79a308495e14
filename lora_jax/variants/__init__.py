"""DoRA, PiSSA/OLoRA init, LoRA+, and many adapters on one base."""

from lora_jax.variants.multi import MultiLoraWeight
from lora_jax.variants.multi import adapter_ids
from lora_jax.variants.multi import adapter_names
from lora_jax.variants.multi import add_adapter
from lora_jax.variants.multi import add_weighted_adapter
from lora_jax.variants.multi import remove_adapter
from lora_jax.variants.multi import restore_adapters
from lora_jax.variants.multi import save_adapters
from lora_jax.variants.multi import set_adapter
from lora_jax.variants.multi import stack_adapters
from lora_jax.variants.multi import to_peft_adapters
from lora_jax.variants.multi import unstack_adapter
from lora_jax.variants.multi import with_adapter_ids
from lora_jax.variants.dora import DoraWeight
from lora_jax.variants.dora import dorafy
from lora_jax.variants.dora import loraplus_labels
from lora_jax.variants.dora import loraplus_optimizer
from lora_jax.variants.dora import olora_init
from lora_jax.variants.dora import pissa_init
from lora_jax.variants.dora import to_dora

__all__ = (
    "DoraWeight",
    "MultiLoraWeight",
    "adapter_ids",
    "adapter_names",
    "add_adapter",
    "add_weighted_adapter",
    "dorafy",
    "loraplus_labels",
    "loraplus_optimizer",
    "olora_init",
    "pissa_init",
    "remove_adapter",
    "restore_adapters",
    "save_adapters",
    "set_adapter",
    "stack_adapters",
    "to_dora",
    "to_peft_adapters",
    "unstack_adapter",
    "with_adapter_ids",
)
