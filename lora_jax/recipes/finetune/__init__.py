"""The `lora-jax finetune` recipe."""
