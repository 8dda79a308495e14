"""Other ecosystems: Hugging Face names, PEFT adapters, merged safetensors exports."""

from lora_jax.interop.gguf_lora import to_gguf_lora
from lora_jax.interop.hf_export import export_merged
from lora_jax.interop.hf_names import HF_LLAMA_NAMES
from lora_jax.interop.hf_names import LLAMA_MODULE_MAP
from lora_jax.interop.hf_names import is_llama_tree
from lora_jax.interop.hf_names import llama_from_hf
from lora_jax.interop.hf_names import llama_to_hf
from lora_jax.interop.peft import to_peft
from lora_jax.interop.peft import to_peft_adapters
from lora_jax.interop.peft_load import from_peft

__all__ = (
    "HF_LLAMA_NAMES",
    "LLAMA_MODULE_MAP",
    "export_merged",
    "from_peft",
    "is_llama_tree",
    "llama_from_hf",
    "llama_to_hf",
    "to_gguf_lora",
    "to_peft",
    "to_peft_adapters",
)
