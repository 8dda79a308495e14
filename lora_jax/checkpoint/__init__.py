"""Adapter-only orbax checkpoints: save, verified restore, fingerprints, byte counts."""

from lora_jax.checkpoint.adapter import BaseMismatchError
from lora_jax.checkpoint.adapter import CheckpointIntegrityError
from lora_jax.checkpoint.adapter import adapter_bytes
from lora_jax.checkpoint.adapter import adapter_steps
from lora_jax.checkpoint.adapter import base_fingerprint
from lora_jax.checkpoint.adapter import export_merged
from lora_jax.checkpoint.adapter import model_bytes
from lora_jax.checkpoint.adapter import read_adapter_metadata
from lora_jax.checkpoint.adapter import restore_adapter
from lora_jax.checkpoint.adapter import save_adapter

__all__ = (
    "BaseMismatchError",
    "CheckpointIntegrityError",
    "adapter_bytes",
    "adapter_steps",
    "base_fingerprint",
    "export_merged",
    "model_bytes",
    "read_adapter_metadata",
    "restore_adapter",
    "save_adapter",
)
