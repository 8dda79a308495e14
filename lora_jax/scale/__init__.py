"""Sharding specs, placement on a mesh, the sharded train step, and the AOT memory plan."""

from lora_jax.scale.fsdp import fsdp_specs
from lora_jax.scale.fsdp import logical_specs
from lora_jax.scale.placement import named_shardings
from lora_jax.scale.placement import per_device_bytes
from lora_jax.scale.placement import shard_params
from lora_jax.scale.plan import plan_memory
from lora_jax.scale.specs import lora_specs
from lora_jax.scale.step import TrainStep
from lora_jax.scale.step import cross_entropy_loss
from lora_jax.scale.step import make_train_step
from lora_jax.scale.step import opt_state_specs

__all__ = (
    "TrainStep",
    "cross_entropy_loss",
    "fsdp_specs",
    "logical_specs",
    "lora_specs",
    "make_train_step",
    "named_shardings",
    "opt_state_specs",
    "per_device_bytes",
    "plan_memory",
    "shard_params",
)
