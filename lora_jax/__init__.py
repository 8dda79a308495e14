"""lora_jax: LoRA and QLoRA as a pure function of a parameter pytree."""

from importlib import metadata as _metadata

from lora_jax import interop
from lora_jax import models
from lora_jax.core import ImplicitArray
from lora_jax.core import MaterializationError
from lora_jax.core import MaterializationWarning
from lora_jax.core import register
from lora_jax.lora import LoraWeight
from lora_jax.lora import RankWarning
from lora_jax.lora import Trainable
from lora_jax.lora import combine
from lora_jax.lora import count_params
from lora_jax.lora import default_layout
from lora_jax.lora import infer_layout
from lora_jax.lora import lora
from lora_jax.lora import lora_optimizer
from lora_jax.lora import lorafy
from lora_jax.lora import mark_trainable
from lora_jax.lora import merge
from lora_jax.lora import register_dot_rule
from lora_jax.lora import split
from lora_jax.lora import trainable_labels
from lora_jax.lora import trainable_mask
from lora_jax.quant import QuantizedWeight
from lora_jax.quant import bits_per_param
from lora_jax.quant import dequantize
from lora_jax.quant import from_bnb_state
from lora_jax.quant import is_quantized
from lora_jax.quant import quantize
from lora_jax.quant import to_bnb_state
from lora_jax.variants import DoraWeight
from lora_jax.variants import MultiLoraWeight
from lora_jax.variants import adapter_ids
from lora_jax.variants import adapter_names
from lora_jax.variants import add_adapter
from lora_jax.variants import add_weighted_adapter
from lora_jax.variants import dorafy
from lora_jax.variants import loftq_init
from lora_jax.variants import loraplus_labels
from lora_jax.variants import loraplus_optimizer
from lora_jax.variants import olora_init
from lora_jax.variants import pissa_init
from lora_jax.variants import pissa_to_lora
from lora_jax.variants import remove_adapter
from lora_jax.variants import safe_merge
from lora_jax.variants import set_adapter
from lora_jax.variants import stack_adapters
from lora_jax.variants import to_dora
from lora_jax.variants import unstack_adapter
from lora_jax.variants import with_adapter_ids
from lora_jax.checkpoint import BaseMismatchError
from lora_jax.checkpoint import CheckpointIntegrityError
from lora_jax.checkpoint import adapter_bytes
from lora_jax.checkpoint import adapter_steps
from lora_jax.checkpoint import base_fingerprint
from lora_jax.checkpoint import model_bytes
from lora_jax.checkpoint import read_adapter_metadata
from lora_jax.checkpoint import restore_adapter
from lora_jax.checkpoint import restore_adapters
from lora_jax.checkpoint import save_adapter
from lora_jax.checkpoint import save_adapters
from lora_jax.scale import TrainStep
from lora_jax.scale import cross_entropy_loss
from lora_jax.scale import fsdp_specs
from lora_jax.scale import logical_specs
from lora_jax.scale import lora_specs
from lora_jax.scale import make_train_step
from lora_jax.scale import named_shardings
from lora_jax.scale import opt_state_specs
from lora_jax.scale import per_device_bytes
from lora_jax.scale import plan_memory
from lora_jax.scale import shard_params
from lora_jax.interop import export_merged
from lora_jax.interop import from_peft
from lora_jax.interop import to_gguf_lora
from lora_jax.interop import to_peft
from lora_jax.interop import to_peft_adapters

try:
    __version__ = _metadata.version("lora-jax")
except _metadata.PackageNotFoundError:   # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = (
    "BaseMismatchError",
    "CheckpointIntegrityError",
    "DoraWeight",
    "ImplicitArray",
    "LoraWeight",
    "MaterializationError",
    "MaterializationWarning",
    "MultiLoraWeight",
    "RankWarning",
    "Trainable",
    "QuantizedWeight",
    "TrainStep",
    "adapter_bytes",
    "adapter_ids",
    "adapter_names",
    "adapter_steps",
    "add_adapter",
    "add_weighted_adapter",
    "base_fingerprint",
    "bits_per_param",
    "combine",
    "count_params",
    "cross_entropy_loss",
    "default_layout",
    "dequantize",
    "dorafy",
    "export_merged",
    "from_bnb_state",
    "from_peft",
    "fsdp_specs",
    "infer_layout",
    "interop",
    "is_quantized",
    "loftq_init",
    "logical_specs",
    "lora",
    "lora_optimizer",
    "lora_specs",
    "lorafy",
    "mark_trainable",
    "loraplus_labels",
    "loraplus_optimizer",
    "make_train_step",
    "merge",
    "model_bytes",
    "models",
    "named_shardings",
    "olora_init",
    "opt_state_specs",
    "per_device_bytes",
    "pissa_init",
    "pissa_to_lora",
    "plan_memory",
    "quantize",
    "read_adapter_metadata",
    "register",
    "register_dot_rule",
    "remove_adapter",
    "restore_adapter",
    "restore_adapters",
    "safe_merge",
    "save_adapter",
    "save_adapters",
    "set_adapter",
    "shard_params",
    "split",
    "stack_adapters",
    "to_bnb_state",
    "to_dora",
    "to_gguf_lora",
    "to_peft",
    "to_peft_adapters",
    "trainable_labels",
    "trainable_mask",
    "unstack_adapter",
    "with_adapter_ids",
)
