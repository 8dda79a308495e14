"""The implicit-array base, the jaxpr interpreter and its rule registry; knows no LoRA."""

from lora_jax.core import checks as checks
from lora_jax.core import control_flow as _control_flow  # noqa: F401  (registers its rules)
from lora_jax.core import shard_map as _shard_map  # noqa: F401  (registers its rules)
from lora_jax.core.implicit import ImplicitArray
from lora_jax.core.implicit import dense
from lora_jax.core.implicit import is_implicit
from lora_jax.core.implicit import node
from lora_jax.core.implicit import static
from lora_jax.core.interpreter import Context
from lora_jax.core.interpreter import MaterializationError
from lora_jax.core.interpreter import MaterializationWarning
from lora_jax.core.interpreter import interpret
from lora_jax.core.registry import register
from lora_jax.core.targets import Targets
from lora_jax.core.targets import is_default_target
from lora_jax.core.targets import is_float_array
from lora_jax.core.targets import leaf_name
from lora_jax.core.targets import select_leaves
from lora_jax.core.tree import path_str

__all__ = (
    "Context",
    "ImplicitArray",
    "MaterializationError",
    "MaterializationWarning",
    "Targets",
    "dense",
    "interpret",
    "is_default_target",
    "is_float_array",
    "is_implicit",
    "leaf_name",
    "node",
    "path_str",
    "register",
    "select_leaves",
    "static",
)
