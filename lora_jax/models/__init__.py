"""Reference models (Flax linen) and checkpoint loading."""

from lora_jax.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    generate,
    init_cache,
)
from lora_jax.models.loading import (
    Tokenizer,
    format_chatml,
    from_pretrained,
    load_config,
    load_tokenizer,
)
from lora_jax.models.smollm2 import default_model_path

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "generate",
    "init_cache",
    "Tokenizer",
    "format_chatml",
    "from_pretrained",
    "load_config",
    "load_tokenizer",
    "default_model_path",
]
