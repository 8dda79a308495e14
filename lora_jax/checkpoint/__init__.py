"""Adapter-only orbax checkpoints: save, verified restore, fingerprints, byte counts.

A checkpoint root holds one directory per committed step (see
:mod:`lora_jax.checkpoint.orbax_io` for the layout, :mod:`lora_jax.checkpoint.meta` for
the JSON metadata): the adapter's arrays, optionally the optimizer state, and a
fingerprint of the frozen base. Saves are atomic, restores verify every array's
sha256, and nothing is ever unpickled.
"""

from lora_jax.checkpoint.atomic import atomic_file
from lora_jax.checkpoint.atomic import check_destination
from lora_jax.checkpoint.atomic import replace_dir
from lora_jax.checkpoint.bytes import adapter_bytes
from lora_jax.checkpoint.bytes import model_bytes
from lora_jax.checkpoint.bytes import nbytes
from lora_jax.checkpoint.config import node_config
from lora_jax.checkpoint.errors import BaseMismatchError
from lora_jax.checkpoint.errors import CheckpointIntegrityError
from lora_jax.checkpoint.files import read_json
from lora_jax.checkpoint.files import read_safetensors
from lora_jax.checkpoint.files import safetensors_header
from lora_jax.checkpoint.files import write_safetensors
from lora_jax.checkpoint.fingerprint import base_fingerprint
from lora_jax.checkpoint.multi import restore_adapters
from lora_jax.checkpoint.multi import save_adapters
from lora_jax.checkpoint.restore import restore_adapter
from lora_jax.checkpoint.save import save_adapter
from lora_jax.checkpoint.steps import adapter_steps
from lora_jax.checkpoint.steps import read_adapter_metadata

__all__ = (
    "BaseMismatchError",
    "CheckpointIntegrityError",
    "adapter_bytes",
    "adapter_steps",
    "atomic_file",
    "base_fingerprint",
    "check_destination",
    "model_bytes",
    "nbytes",
    "node_config",
    "read_adapter_metadata",
    "read_json",
    "read_safetensors",
    "replace_dir",
    "restore_adapter",
    "restore_adapters",
    "save_adapter",
    "save_adapters",
    "safetensors_header",
    "write_safetensors",
)
