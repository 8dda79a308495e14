"""Interoperability with other LoRA ecosystems (Hugging Face PEFT)."""

from lora_jax.interop.peft import LLAMA_MODULE_MAP, from_peft, to_peft

__all__ = ["LLAMA_MODULE_MAP", "from_peft", "to_peft"]
