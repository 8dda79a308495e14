"""Training recipes built on the library."""

from lora_jax.recipes.host_memory import TUNABLES as MALLOC_TUNABLES
from lora_jax.recipes.host_memory import reexec_with_malloc_tunables

__all__ = ("MALLOC_TUNABLES", "reexec_with_malloc_tunables")
