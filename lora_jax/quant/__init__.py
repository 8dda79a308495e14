"""NF4/FP4/int4 codes, kernels, the QuantizedWeight node, the tree API, bitsandbytes state."""

from lora_jax.quant.api import bits_per_param
from lora_jax.quant.api import dequantize
from lora_jax.quant.api import is_quantized
from lora_jax.quant.api import quantize
from lora_jax.quant.api import quantize_array
from lora_jax.quant.bnb import from_bnb_state
from lora_jax.quant.bnb import to_bnb_state
from lora_jax.quant.codes import FP4_CODE
from lora_jax.quant.codes import NF4_CODE
from lora_jax.quant.codes import dynamic_map
from lora_jax.quant.node import QuantizedWeight

__all__ = (
    "FP4_CODE",
    "NF4_CODE",
    "QuantizedWeight",
    "bits_per_param",
    "dequantize",
    "dynamic_map",
    "from_bnb_state",
    "is_quantized",
    "quantize",
    "quantize_array",
    "to_bnb_state",
)
