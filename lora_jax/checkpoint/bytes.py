"""Byte counts of parameter trees as stored: the one byte counter of the package.

A quantized leaf counts its packed codes and scales (what it stores), never its
dequantized size. Abstract trees (``jax.eval_shape``) count the same as real ones, so
the size of a 7B adapter is known without allocating the model.

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.lora import lorafy
    >>> p = lorafy({"k": jnp.ones((5, 7))}, rank=2, targets="k")
    >>> adapter_bytes(p), model_bytes(p)      # A 5x2 + B 2x7 float32; + w0 5x7
    (96, 236)
"""

from __future__ import annotations

import math

import jax
import numpy as np

from lora_jax.lora import split

__all__ = ["adapter_bytes", "model_bytes", "nbytes"]


def nbytes(x) -> int:
    """Bytes of one leaf: an array, a ``jax.ShapeDtypeStruct``, a scalar, or ``None`` (0)."""
    if x is None:
        return 0
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return int(np.asarray(x).nbytes)


def adapter_bytes(params) -> int:
    """Bytes of the trainable leaves (A and B of every LoRA node, DoRA's magnitude...)."""
    trainable, _ = split(params)
    return model_bytes(trainable)


def model_bytes(params) -> int:
    """Bytes of every array leaf as stored, adapter included."""
    return sum(nbytes(x) for x in jax.tree.leaves(params))
