"""The implicit-array base, the jaxpr interpreter and its rule registry; knows no LoRA."""

from lora_jax.core.implicit import ImplicitArray

__all__ = (
    "ImplicitArray",
)
