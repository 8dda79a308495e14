"""Reference Llama (Flax linen), its configs, HF / GGUF / tokenizer loading, SmolLM2."""

from lora_jax.models.configs import LLAMA_CONFIGS
from lora_jax.models.configs import LlamaConfig
from lora_jax.models.configs import llama_config
from lora_jax.models.decoding import generate
from lora_jax.models.decoding import generate_batch
from lora_jax.models.decoding import stream_tokens
from lora_jax.models.losses import fused_cross_entropy
from lora_jax.models.losses import lm_loss
from lora_jax.models.gguf import gguf_to_hf_state_dict
from lora_jax.models.hf import hf_state_dict_to_params
from lora_jax.models.hf import load_hf_state_dict
from lora_jax.models.llama import LlamaForCausalLM
from lora_jax.models.llama import RMSNorm
from lora_jax.models.llama import init_cache
from lora_jax.models.loading import from_pretrained
from lora_jax.models.loading import load_config
from lora_jax.models.rope import rope_inv_freq
from lora_jax.models.smollm2 import default_model_path
from lora_jax.models.tokenizer import Tokenizer
from lora_jax.models.tokenizer import format_chatml
from lora_jax.models.tokenizer import load_tokenizer
from lora_jax.models.wheels import cache_dir
from lora_jax.models.wheels import extract_member
from lora_jax.models.wheels import fetch_wheel
from lora_jax.models.wheels import sha256_file

__all__ = (
    "LLAMA_CONFIGS",
    "LlamaConfig",
    "LlamaForCausalLM",
    "RMSNorm",
    "Tokenizer",
    "cache_dir",
    "default_model_path",
    "extract_member",
    "fetch_wheel",
    "format_chatml",
    "from_pretrained",
    "fused_cross_entropy",
    "generate",
    "generate_batch",
    "gguf_to_hf_state_dict",
    "hf_state_dict_to_params",
    "init_cache",
    "llama_config",
    "lm_loss",
    "load_config",
    "load_hf_state_dict",
    "load_tokenizer",
    "rope_inv_freq",
    "sha256_file",
    "stream_tokens",
)
