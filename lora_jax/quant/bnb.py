"""bitsandbytes' 4-bit weights as transformers stores them in safetensors, both ways.

:func:`from_bnb_state` builds a :class:`QuantizedWeight` from the tensors
without requantizing (the node's storage is bitsandbytes' own layout), and
:func:`to_bnb_state` writes them back, key order and quant_state JSON as
``QuantState.as_dict(packed=True)``.

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.quant import quantize_array
    >>> q = quantize_array(jnp.ones((5, 7)), "nf4", block_size=32)
    >>> state = to_bnb_state(q, "model.proj.")
    >>> back = from_bnb_state(state, "model.proj.")
    >>> back.shape, bool((back.codes == q.codes).all())
    ((5, 7), True)
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from lora_jax.quant.api import check_kind
from lora_jax.quant.codes import NESTED_BLOCK, code, dynamic_map
from lora_jax.quant.node import QuantizedWeight

_TORCH_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


def _dtype_name(dtype) -> str:
    d = np.dtype(jnp.dtype(dtype))
    if d == np.dtype(jnp.bfloat16):
        return "bfloat16"
    if d in (np.dtype(np.float16), np.dtype(np.float32)):
        return d.name
    raise ValueError(f"bitsandbytes stores float32, float16 or bfloat16 weights, not {d}")


def _same_table(values, table) -> bool:
    return np.array_equal(np.asarray(values, np.float32).view(np.uint32), table.view(np.uint32))


def _read_meta(tensors: Mapping[str, Any], prefix: str) -> dict:
    w = prefix + "weight"
    qs_keys = [k for k in tensors if k.startswith(w + ".quant_state.bitsandbytes__")]
    if w not in tensors or len(qs_keys) != 1:
        raise ValueError(f"no bitsandbytes 4-bit weight under prefix {prefix!r}: expected "
                         f"{w!r} and exactly one {w + '.quant_state.bitsandbytes__<nf4|fp4>'!r}; "
                         f"found {sorted(k for k in tensors if k.startswith(prefix))[:12]}")
    meta = json.loads(bytes(np.asarray(tensors[qs_keys[0]], np.uint8).reshape(-1)).decode("utf-8"))
    kind = meta["quant_type"]
    if kind not in ("nf4", "fp4") or qs_keys[0].rsplit("__", 1)[-1] != kind:
        raise ValueError(f"{qs_keys[0]!r}: unsupported quant_type {kind!r}")
    check_kind(kind, int(meta["blocksize"]), 1)
    qmap = np.asarray(tensors[w + ".quant_map"], np.float32).reshape(-1)
    if qmap.shape != (16,) or not _same_table(qmap, code(kind)):
        raise ValueError(f"{w + '.quant_map'!r} is not bitsandbytes' standard {kind} table; "
                         "custom 4-bit code tables are not supported")
    if len(meta["shape"]) != 2:
        raise ValueError(f"{w!r}: expected a 2-D (out, in) weight, got shape {meta['shape']}")
    return meta


def _layer_shape(torch_shape, shape, in_axes) -> tuple:
    out_f, in_f = torch_shape
    if shape is None:
        if in_axes not in ((0,), (1,)):
            raise ValueError("pass shape= (the layer shape in your axis order) with these in_axes")
        return (in_f, out_f) if in_axes == (0,) else (out_f, in_f)
    layer_shape = tuple(int(v) for v in shape)
    outs = [j for j in range(len(layer_shape)) if j not in in_axes]
    if (not in_axes or not outs or any(not 0 <= j < len(layer_shape) for j in in_axes)
            or math.prod(layer_shape[j] for j in in_axes) != in_f
            or math.prod(layer_shape[j] for j in outs) != out_f):
        raise ValueError(f"shape={layer_shape} with in_axes={in_axes} does not match the "
                         f"bitsandbytes (out, in) shape {tuple(torch_shape)}")
    return layer_shape


def _double_quant_state(tensors, w: str, meta: dict, nb: int):
    """(uint8 absmax codes, nested absmax, offset, nested block size, nested code)."""
    nested_bs = int(meta["nested_blocksize"])
    nested = np.asarray(tensors[w + ".nested_absmax"], np.float32).reshape(-1)
    nmap = np.asarray(tensors[w + ".nested_quant_map"], np.float32).reshape(-1)
    if nmap.shape != (256,):
        raise ValueError(f"{w + '.nested_quant_map'!r} must hold 256 values")
    if nested.size != -(-nb // nested_bs):
        raise ValueError(f"{w + '.nested_absmax'!r} has {nested.size} values; expected "
                         f"{-(-nb // nested_bs)}")
    nested_code = None if _same_table(nmap, dynamic_map()) else tuple(float(v) for v in nmap)
    absmax = np.asarray(tensors[w + ".absmax"]).reshape(-1).astype(np.uint8)
    offset = np.asarray(meta["nested_offset"], np.float32)
    return absmax, jnp.asarray(nested), jnp.asarray(offset), nested_bs, nested_code


def from_bnb_state(tensors: Mapping[str, Any], prefix: str, *, in_axes=None,
                   in_ndim: int | None = None, dtype=None,
                   shape: Optional[Sequence[int]] = None) -> QuantizedWeight:
    """Load a bitsandbytes 4-bit weight as transformers stores it in safetensors.

    ``tensors`` maps names to arrays (e.g. ``safetensors.numpy.load_file``);
    ``prefix`` is the module prefix including the trailing dot
    (``"model.layers.0.self_attn.q_proj."``). Reads ``{prefix}weight`` (packed
    uint8), ``weight.absmax``, ``weight.quant_map``, optional
    ``weight.nested_absmax``/``weight.nested_quant_map`` and the JSON in
    ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``), without
    requantizing. The torch weight is (out, in); the node's logical shape is
    the Flax (in, out) (``in_axes=(0,)``, the default), the torch (out, in) with
    ``in_axes=(1,)``, or ``shape`` (the layer shape, input axes at ``in_axes``;
    ``in_ndim=k`` means ``in_axes=(0, ..., k-1)``). ``dtype`` defaults to the
    dtype recorded by bitsandbytes.
    """
    w = prefix + "weight"
    meta = _read_meta(tensors, prefix)
    in_axes = tuple(int(j) for j in in_axes) if in_axes is not None else tuple(
        range(1 if in_ndim is None else int(in_ndim)))
    torch_shape = tuple(int(v) for v in meta["shape"])
    layer_shape = _layer_shape(torch_shape, shape, in_axes)
    n, bs = math.prod(torch_shape), int(meta["blocksize"])
    nb = -(-n // bs)
    codes = np.ascontiguousarray(np.asarray(tensors[w])).reshape(-1).view(np.uint8)
    if codes.size != (n + 1) // 2:
        raise ValueError(f"{w!r} holds {codes.size} bytes; shape {torch_shape} needs "
                         f"{(n + 1) // 2}")
    absmax = np.asarray(tensors[w + ".absmax"]).reshape(-1)
    if absmax.size != nb:
        raise ValueError(f"{w + '.absmax'!r} holds {absmax.size} values; expected {nb}")
    nested = offset = nested_code = None
    nested_bs = NESTED_BLOCK
    if w + ".nested_absmax" in tensors:
        absmax, nested, offset, nested_bs, nested_code = _double_quant_state(tensors, w, meta, nb)
    else:
        absmax = absmax.astype(np.float32)
    dtype = _TORCH_DTYPES[meta["dtype"]] if dtype is None else dtype
    return QuantizedWeight(
        codes=jnp.asarray(codes), scales=jnp.asarray(absmax), nested_scales=nested, offset=offset,
        kind=meta["quant_type"], block_size=bs, layer_shape=layer_shape, in_axes=in_axes,
        dtype=np.dtype(jnp.dtype(dtype)), nested_block_size=nested_bs, nested_code=nested_code)


def to_bnb_state(q: QuantizedWeight, prefix: str) -> dict[str, np.ndarray]:
    """The tensors transformers/bitsandbytes store for this weight (inverse of from_bnb_state).

    Only unstacked nf4/fp4 nodes: index stacked ones per layer (``q[l]``).
    Key order and the quant_state JSON follow ``QuantState.as_dict(packed=True)``.
    """
    if not isinstance(q, QuantizedWeight) or q.kind not in ("nf4", "fp4"):
        raise ValueError("to_bnb_state needs an nf4/fp4 QuantizedWeight "
                         f"(got {getattr(q, 'kind', type(q).__name__)!r})")
    if q.stack_ndim:
        raise ValueError(f"to_bnb_state needs one layer; this node is stacked {q.stack_shape}: "
                         "export q[l] for each layer l")
    w = prefix + "weight"
    out: dict[str, np.ndarray] = {w: np.asarray(q.codes, np.uint8).reshape(-1, 1)}
    meta: dict[str, Any] = {"quant_type": q.kind, "blocksize": q.block_size,
                            "dtype": _dtype_name(q.dtype), "shape": [q.out_features, q.in_features]}
    absmax_dtype = np.uint8 if q.double_quant else np.float32
    out[w + ".absmax"] = np.asarray(q.scales, absmax_dtype).reshape(-1)
    out[w + ".quant_map"] = np.array(code(q.kind), np.float32)
    if q.double_quant:
        out[w + ".nested_absmax"] = np.asarray(q.nested_scales, np.float32).reshape(-1)
        nmap = dynamic_map() if q.nested_code is None else np.asarray(q.nested_code, np.float32)
        out[w + ".nested_quant_map"] = np.array(nmap, np.float32)
        meta.update({"nested_blocksize": q.nested_block_size, "nested_dtype": "float32",
                     "nested_offset": float(np.asarray(q.offset, np.float32))})
    out[w + ".quant_state.bitsandbytes__" + q.kind] = np.frombuffer(
        json.dumps(meta).encode("utf-8"), np.uint8).copy()
    return out
