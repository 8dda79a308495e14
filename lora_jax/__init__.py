"""lora_jax: LoRA and QLoRA as a pure function of a parameter pytree."""

from lora_jax import interop
from lora_jax import models
from lora_jax._checkpoint import BaseMismatchError
from lora_jax._checkpoint import CheckpointIntegrityError
from lora_jax._checkpoint import adapter_bytes
from lora_jax._checkpoint import adapter_steps
from lora_jax._checkpoint import base_fingerprint
from lora_jax._checkpoint import export_merged
from lora_jax._checkpoint import model_bytes
from lora_jax._checkpoint import read_adapter_metadata
from lora_jax._checkpoint import restore_adapter
from lora_jax._checkpoint import save_adapter
from lora_jax._infer import infer_layout
from lora_jax._layout import default_layout
from lora_jax._lorafy import lorafy
from lora_jax._lorafy import merge
from lora_jax._nodes import ImplicitArray
from lora_jax._nodes import LoraWeight
from lora_jax._plan import plan_memory
from lora_jax._sharding import fsdp_specs
from lora_jax._sharding import logical_specs
from lora_jax._sharding import lora_specs
from lora_jax._sharding import named_shardings
from lora_jax._sharding import per_device_bytes
from lora_jax._sharding import shard_params
from lora_jax._step import TrainStep
from lora_jax._step import cross_entropy_loss
from lora_jax._step import make_train_step
from lora_jax._step import opt_state_specs
from lora_jax._quant import QuantizedWeight
from lora_jax._quant import bits_per_param
from lora_jax._quant import dequantize
from lora_jax._quant import from_bnb_state
from lora_jax._quant import is_quantized
from lora_jax._quant import quantize
from lora_jax._quant import to_bnb_state
from lora_jax._train import combine
from lora_jax._train import count_params
from lora_jax._train import lora_optimizer
from lora_jax._train import split
from lora_jax._train import trainable_labels
from lora_jax._train import trainable_mask
from lora_jax._transform import MaterializationError
from lora_jax._transform import MaterializationWarning
from lora_jax._transform import lora
from lora_jax.interop.peft import from_peft
from lora_jax.interop.peft import to_peft

__version__ = "0.1.0"

__all__ = (
    "BaseMismatchError",
    "CheckpointIntegrityError",
    "ImplicitArray",
    "LoraWeight",
    "MaterializationError",
    "MaterializationWarning",
    "QuantizedWeight",
    "TrainStep",
    "adapter_bytes",
    "adapter_steps",
    "base_fingerprint",
    "bits_per_param",
    "combine",
    "count_params",
    "cross_entropy_loss",
    "default_layout",
    "dequantize",
    "export_merged",
    "from_bnb_state",
    "from_peft",
    "fsdp_specs",
    "infer_layout",
    "interop",
    "is_quantized",
    "logical_specs",
    "lora",
    "lora_optimizer",
    "lora_specs",
    "lorafy",
    "make_train_step",
    "merge",
    "model_bytes",
    "models",
    "named_shardings",
    "opt_state_specs",
    "per_device_bytes",
    "plan_memory",
    "quantize",
    "read_adapter_metadata",
    "restore_adapter",
    "save_adapter",
    "shard_params",
    "split",
    "to_bnb_state",
    "to_peft",
    "trainable_labels",
    "trainable_mask",
)
