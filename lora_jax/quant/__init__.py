"""NF4/FP4/int4 codes, kernels, the QuantizedWeight node and the tree API."""

from lora_jax.quant.quantize import QuantizedWeight
from lora_jax.quant.quantize import bits_per_param
from lora_jax.quant.quantize import dequantize
from lora_jax.quant.quantize import from_bnb_state
from lora_jax.quant.quantize import is_quantized
from lora_jax.quant.quantize import quantize
from lora_jax.quant.quantize import to_bnb_state

__all__ = (
    "QuantizedWeight",
    "bits_per_param",
    "dequantize",
    "from_bnb_state",
    "is_quantized",
    "quantize",
    "to_bnb_state",
)
