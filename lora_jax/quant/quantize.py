"""4-bit weight quantization: NF4 / FP4 (bitsandbytes layout) and int4.

``quantize(params, "nf4")`` replaces targeted kernels by :class:`QuantizedWeight`
nodes, registered pytrees whose array leaves are the packed codes and their
scales. ``node.materialize()`` dequantizes with ``jnp`` ops only, so it runs
inside ``jit`` (``lora(fn)`` calls it where a kernel meets ``dot_general``).

Storage, per layer (S = leading stacked-layer axes of the kernel ``[*S, *I, *O]``;
every array leaf carries S in front, so ``lax.scan``/``vmap``/indexing along
axis 0 yields the node of one layer):

* ``nf4`` / ``fp4`` -- exactly bitsandbytes' ``quantize_4bit`` layout. The
  kernel is seen in torch orientation ``(out, in)`` = transpose of the Flax
  ``[prod(I), prod(O)]`` matrix, flattened row-major and cut into blocks of
  ``block_size`` (the last block may be partial). Per block a float32 absmax;
  ``x * (1/absmax)`` (``x / absmax`` in a partial last block, as bitsandbytes
  does) clamped to [-1, 1] goes to the nearest of 16 code values, ties to the
  lower code. Two codes per ``uint8``, the first element in the HIGH nibble.

  - ``codes``  uint8   ``[*S, ceil(n/2)]``
  - ``scales`` float32 ``[*S, nblocks]``  (absmax), or with ``double_quant``
    uint8 ``[*S, nblocks]``: absmax - mean(absmax) quantized 8-bit blockwise
    (blocks of 256) with bitsandbytes' signed dynamic map,
  - ``nested_scales`` float32 ``[*S, ceil(nblocks/256)]`` and ``offset``
    float32 ``[*S]`` (the mean), both ``None`` without double quant.

* ``int4`` -- symmetric, one float32 scale per group of ``group_size``
  consecutive rows of the contraction (in) axis and per output column:
  ``scale = absmax(group) / 7``, codes ``round(x / scale)`` in [-7, 7]
  (-8 is never produced, so the code grid is symmetric and the error is at
  most ``scale / 2``). ``group_size`` (default 128) is clamped to ``prod(I)``;
  when ``prod(I)`` is not a multiple of it the in axis is zero-padded to one
  (``padded_in`` records the padded length). Codes are packed two per byte
  along the in axis (first row in the HIGH nibble, two's complement nibbles).

  - ``codes``  uint8   ``[*S, ceil(padded_in/2), prod(O)]``
  - ``scales`` float32 ``[*S, padded_in/group_size, prod(O)]``

``bits_per_param`` counts real storage (``jnp.int4`` would take a byte per
value on CPU, so codes are always packed into ``uint8`` here).

Numerics notes. XLA flushes float32 subnormals to zero on CPU and contracts
``a*b + c`` into an FMA inside fusions; both are handled so that quantize and
materialize reproduce bitsandbytes bit-for-bit on normal-range inputs (the
double-quant dequantization ``code*nested + offset`` is kept unfused by a
``where``; subnormal weights are treated as zero).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.lora.layout import LayoutSpec, resolve_layout
from lora_jax.core.tree import path_str
from lora_jax.core.implicit import ImplicitArray, node as _node, static
from lora_jax.lora.weight import LoraWeight

__all__ = [
    "QuantizedWeight",
    "quantize",
    "dequantize",
    "bits_per_param",
    "is_quantized",
    "from_bnb_state",
    "to_bnb_state",
    "NF4_CODE",
    "FP4_CODE",
    "dynamic_map",
]

KINDS = ("nf4", "fp4", "int4")
NESTED_BLOCK = 256

# bitsandbytes.functional.get_4bit_type("nf4") (float32).
NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
     0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0], dtype=np.float32)
NF4_CODE.setflags(write=False)

# bitsandbytes.functional.get_4bit_type("fp4"): an E2M1 float in bit-pattern
# order divided (float32) by 12. Index 8 is +0.0 (bnb's list holds the int -0).
FP4_CODE = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3],
                     dtype=np.float32) / np.float32(12.0))
FP4_CODE.setflags(write=False)

_TINY_BITS = np.float32(1e-38).view(np.uint32)  # bnb stores clamp(absmax, 1e-38) for a zero partial block


def _fma32(a, b, c):
    # float32 fused multiply-add (the product of two float32 is exact in float64).
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps) in float32 as torch's CPU kernel computes it."""
    f = np.float32
    a, b = f(start), f(end)
    step = (b - a) / f(steps - 1)
    half = steps // 2
    out = [_fma32(step, f(i), a) if i < half else _fma32(-step, f(steps - i - 1), b)
           for i in range(steps)]
    return np.array(out, dtype=np.float32)


@functools.lru_cache(maxsize=None)
def _dynamic_map_cached(signed: bool, max_exponent_bits: int, total_bits: int) -> np.ndarray:
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    f = np.float32
    i = 0
    for i in range(max_exponent_bits):
        n = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bd = _torch_linspace_f32(0.1, 1.0, n)
        means = (bd[:-1] + bd[1:]) / f(2.0)
        scale = f(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    if additional_items > 0:
        bd = _torch_linspace_f32(0.1, 1.0, additional_items + 1)
        means = (bd[:-1] + bd[1:]) / f(2.0)
        scale = f(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).tolist()
        if signed:
            data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    data.sort()
    out = np.array(data, dtype=np.float32)
    out.setflags(write=False)
    return out


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' ``create_dynamic_map`` (float32, 2**total_bits sorted values).

    Reproduces torch's CPU ``linspace`` (which uses fused multiply-adds) so the
    table is bit-identical to the one bitsandbytes builds on an FMA CPU.
    """
    return _dynamic_map_cached(bool(signed), int(max_exponent_bits), int(total_bits))


def _code(kind: str) -> np.ndarray:
    return NF4_CODE if kind == "nf4" else FP4_CODE


@functools.lru_cache(maxsize=None)
def _bounds_order(kind: str):
    """Midpoints between sorted code values and the sorted-position -> code map."""
    code = _code(kind)
    order = np.argsort(code, kind="stable")
    s = code[order]
    bounds = (s[:-1] + s[1:]) / np.float32(2.0)
    return bounds.astype(np.float32), order.astype(np.uint8)


def _pair_table(code: np.ndarray) -> np.ndarray:
    """[256, 2] float32: the two values a packed byte stands for (high nibble first)."""
    b = np.arange(256)
    return np.stack([code[b >> 4], code[b & 15]], axis=-1).astype(np.float32)


_INT4_VALUES = np.array([v if v < 8 else v - 16 for v in range(16)], dtype=np.float32)


# --------------------------------------------------------------------------- node


@_node
@dataclasses.dataclass(frozen=True)
class QuantizedWeight(ImplicitArray):
    """A 4-bit quantized kernel ``[*S, *I, *O]``; see the module docstring for the layout.

    ``layer_shape`` is the logical per-layer shape ``(*I, *O)``; S is read off
    the leaves, so a node sliced along axis 0 reports the shape of one layer.
    ``dtype`` is the dtype ``materialize()`` returns (``astype`` changes only it).
    ``nested_code`` is ``None`` for bitsandbytes' standard dynamic map, else the
    256 float32 values of a non-standard one (kept to reproduce a loaded file).
    """

    codes: Any
    scales: Any
    nested_scales: Any = None
    offset: Any = None
    kind: str = static("nf4")
    block_size: int = static(64)
    layer_shape: tuple = static(())
    in_ndim: int = static(1)
    dtype: Any = static(np.dtype(np.float32))
    group_size: int = static(0)
    padded_in: int = static(0)
    nested_block_size: int = static(NESTED_BLOCK)
    nested_code: Optional[tuple] = static(None)

    # ---- derived shape info
    @property
    def stack_ndim(self) -> int:
        return self.codes.ndim - (2 if self.kind == "int4" else 1)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[: self.stack_ndim])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack_shape + tuple(self.layer_shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_scales is not None

    @property
    def in_features(self) -> int:
        return math.prod(self.layer_shape[: self.in_ndim])

    @property
    def out_features(self) -> int:
        return math.prod(self.layer_shape[self.in_ndim:])

    @property
    def layer_size(self) -> int:
        return math.prod(self.layer_shape)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(x) for x in (self.codes, self.scales, self.nested_scales, self.offset)
                   if x is not None)

    def astype(self, dtype) -> "QuantizedWeight":
        return dataclasses.replace(self, dtype=np.dtype(jnp.dtype(dtype)))

    def __getitem__(self, idx) -> "QuantizedWeight":
        """Index the stacked axes only (``q[3]`` is layer 3), like ``lax.scan`` does."""
        if self.stack_ndim == 0:
            raise IndexError("QuantizedWeight has no stacked axes to index")
        return jax.tree_util.tree_map(lambda x: x[idx], self)

    # ---- dequantization (jnp only; traceable)
    def absmax(self) -> jax.Array:
        """Per-block float32 absmax ``[*S, nblocks]`` (nf4/fp4), undoing double quant."""
        if self.kind == "int4":
            raise ValueError("int4 nodes have per-group scales, not absmax; use .scales")
        if self.nested_scales is None:
            return jnp.asarray(self.scales, jnp.float32)
        q = jnp.asarray(self.scales)
        nb = q.shape[-1]
        nb2 = self.nested_scales.shape[-1]
        bs2 = self.nested_block_size
        table = (dynamic_map() if self.nested_code is None
                 else np.asarray(self.nested_code, np.float32))
        vals = jnp.asarray(table)[q.astype(jnp.int32)]
        pad = nb2 * bs2 - nb
        if pad:
            vals = jnp.concatenate(
                [vals, jnp.zeros(vals.shape[:-1] + (pad,), jnp.float32)], axis=-1)
        vals = vals.reshape(vals.shape[:-1] + (nb2, bs2))
        nested = jnp.asarray(self.nested_scales, jnp.float32)
        prod = vals * jnp.expand_dims(nested, -1)
        # Keep XLA from contracting prod + offset into an FMA (bitsandbytes rounds
        # the product, then the sum); a select between them blocks the contraction.
        prod = jnp.where(jnp.isnan(vals), vals, prod)
        prod = prod.reshape(prod.shape[:-2] + (nb2 * bs2,))[..., :nb]
        return prod + jnp.expand_dims(jnp.asarray(self.offset, jnp.float32), -1)

    def materialize(self) -> jax.Array:
        """The dense ``[*S, *I, *O]`` array in ``dtype`` (one jitted computation; traceable)."""
        return _materialize_jit(self)

    def _materialize(self) -> jax.Array:
        if self.kind == "int4":
            return self._materialize_int4()
        codes = jnp.asarray(self.codes)
        sshape = codes.shape[:-1]
        n = self.layer_size
        bs = self.block_size
        absmax = self.absmax()
        nb = absmax.shape[-1]
        pairs = jnp.asarray(_pair_table(_code(self.kind)))[codes.astype(jnp.int32)]
        vals = pairs.reshape(sshape + (2 * codes.shape[-1],))
        total = nb * bs
        if vals.shape[-1] >= total:
            vals = vals[..., :total]
        else:
            vals = jnp.concatenate(
                [vals, jnp.zeros(sshape + (total - vals.shape[-1],), jnp.float32)], axis=-1)
        out = vals.reshape(sshape + (nb, bs)) * jnp.expand_dims(absmax, -1)
        out = out.reshape(sshape + (total,))[..., :n].astype(self.dtype)
        out = out.reshape(sshape + (self.out_features, self.in_features))
        out = jnp.swapaxes(out, -1, -2)
        return out.reshape(sshape + tuple(self.layer_shape))

    def _materialize_int4(self) -> jax.Array:
        codes = jnp.asarray(self.codes)
        sshape = codes.shape[:-2]
        k, n = self.in_features, self.out_features
        g, kp = self.group_size, self.padded_in
        pairs = jnp.asarray(_pair_table(_INT4_VALUES))[codes.astype(jnp.int32)]  # [*S, K2, N, 2]
        vals = jnp.swapaxes(pairs, -1, -2).reshape(sshape + (2 * codes.shape[-2], n))[..., :kp, :]
        vals = vals.reshape(sshape + (kp // g, g, n))
        out = vals * jnp.expand_dims(jnp.asarray(self.scales, jnp.float32), -2)
        out = out.reshape(sshape + (kp, n))[..., :k, :].astype(self.dtype)
        return out.reshape(sshape + tuple(self.layer_shape))


_materialize_jit = jax.jit(lambda q: q._materialize())


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def _nbytes(x) -> int:
    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


# ------------------------------------------------------------------- quantizers


def _bucketize(x, bounds: np.ndarray):
    """#{bounds < x}: torch.bucketize(x, bounds) (right=False), i.e. ties go to the lower code."""
    if len(bounds) <= 32:
        acc = jnp.zeros(x.shape, jnp.int32)
        for b in bounds.tolist():
            acc = acc + (x > jnp.float32(b)).astype(jnp.int32)
        return acc
    return jnp.searchsorted(jnp.asarray(bounds), x, side="left").astype(jnp.int32)


def _blockwise_absmax_scaled(x, bs: int, partial_like_4bit: bool = True):
    """bnb's blockwise absmax and clamp(x/absmax) for x [*S, n] float32.

    Returns (scaled [*S, nb*bs] zero padded, absmax [*S, nb]).
    """
    sshape, n = x.shape[:-1], x.shape[-1]
    nb = -(-n // bs)
    full, rem = n // bs, n % bs
    if nb * bs != n:
        x = jnp.concatenate([x, jnp.zeros(sshape + (nb * bs - n,), jnp.float32)], axis=-1)
    xb = x.reshape(sshape + (nb, bs))
    am = jnp.max(jnp.abs(xb), axis=-1)
    pos = am > jnp.float32(0)
    safe = jnp.where(pos, am, jnp.float32(1))
    inv = jnp.where(pos, jnp.float32(1) / safe, jnp.float32(0))
    scaled = xb * jnp.expand_dims(inv, -1)
    if rem and partial_like_4bit:
        # bitsandbytes' quantize_4bit divides (not multiplies by the reciprocal) in the partial
        # last block and stores clamp(absmax, 1e-38) for it.
        last = xb[..., full:, :] / jnp.expand_dims(safe[..., full:], -1)
        scaled = jnp.concatenate([scaled[..., :full, :], last], axis=-2)
        tiny = jax.lax.bitcast_convert_type(jnp.uint32(_TINY_BITS), jnp.float32)
        am_last = jnp.where(pos[..., full:], am[..., full:], tiny)
        am = jnp.concatenate([am[..., :full], am_last], axis=-1)
    scaled = jnp.clip(scaled, jnp.float32(-1), jnp.float32(1))
    return scaled.reshape(sshape + (nb * bs,)), am


def _pack_nibbles(q, axis: int = -1):
    """uint8 codes in [0, 16) -> bytes, pairs along ``axis``, first element high nibble."""
    q = jnp.moveaxis(q, axis, -1)
    m = q.shape[-1]
    if m % 2:
        q = jnp.concatenate([q, jnp.zeros(q.shape[:-1] + (1,), q.dtype)], axis=-1)
    q = q.reshape(q.shape[:-1] + (q.shape[-1] // 2, 2)).astype(jnp.uint8)
    packed = (q[..., 0] << jnp.uint8(4)) | q[..., 1]
    return jnp.moveaxis(packed, -1, axis)


@functools.partial(jax.jit, static_argnames=("kind", "block_size", "double_quant", "s", "i"))
def _quantize_4bit(w, *, kind: str, block_size: int, double_quant: bool, s: int, i: int):
    sshape = w.shape[:s]
    k = math.prod(w.shape[s:s + i])
    n_out = math.prod(w.shape[s + i:])
    x = w.reshape(sshape + (k, n_out)).astype(jnp.float32)
    x = jnp.swapaxes(x, -1, -2).reshape(sshape + (k * n_out,))      # torch (out, in), row-major
    scaled, am = _blockwise_absmax_scaled(x, block_size)
    n = k * n_out
    scaled = scaled[..., : n + n % 2]   # an odd tail nibble encodes 0.0, as bnb pads
    bounds, order = _bounds_order(kind)
    q = _bucketize(scaled, bounds)
    if kind != "nf4":
        q = jnp.asarray(order)[q]
    codes = _pack_nibbles(q.astype(jnp.uint8))
    if not double_quant:
        return codes, am, None, None
    qa, nested, offset = _double_quant(am)
    return codes, qa, nested, offset


def _double_quant(am):
    """absmax [*S, nb] -> (uint8 codes, nested float32 absmax [*S, nb2], offset [*S])."""
    offset = jnp.mean(am, axis=-1)
    a = am - jnp.expand_dims(offset, -1)
    nb = a.shape[-1]
    # bitsandbytes' 8-bit CPU kernel (quantize_blockwise) treats every block alike.
    scaled, nested = _blockwise_absmax_scaled(a, NESTED_BLOCK, partial_like_4bit=False)
    scaled = scaled[..., :nb]
    table = dynamic_map()
    bounds = ((table[:-1] + table[1:]) / np.float32(2.0)).astype(np.float32)
    q = _bucketize(scaled, bounds)
    # bitsandbytes' CPU kernel emits code 0 in a block whose absmax is 0 (its 0/0
    # goes to the first code); the value dequantizes to 0 either way.
    zero = jnp.repeat(nested == jnp.float32(0), NESTED_BLOCK, axis=-1)[..., :nb]
    q = jnp.where(zero, jnp.int32(0), q).astype(jnp.uint8)
    return q, nested, offset


@functools.partial(jax.jit, static_argnames=("group_size", "s", "i"))
def _quantize_int4(w, *, group_size: int, s: int, i: int):
    sshape = w.shape[:s]
    k = math.prod(w.shape[s:s + i])
    n_out = math.prod(w.shape[s + i:])
    g = group_size
    kp = -(-k // g) * g
    x = w.reshape(sshape + (k, n_out)).astype(jnp.float32)
    if kp != k:
        x = jnp.concatenate([x, jnp.zeros(sshape + (kp - k, n_out), jnp.float32)], axis=-2)
    xg = x.reshape(sshape + (kp // g, g, n_out))
    am = jnp.max(jnp.abs(xg), axis=-2)
    scale = am / jnp.float32(7.0)
    pos = scale > jnp.float32(0)
    safe = jnp.where(pos, scale, jnp.float32(1))
    q = jnp.round(xg / jnp.expand_dims(safe, -2))
    q = jnp.clip(q, jnp.float32(-7), jnp.float32(7)).astype(jnp.int32)
    q = jnp.where(jnp.expand_dims(pos, -2), q, jnp.int32(0))
    nib = (q.reshape(sshape + (kp, n_out)) & jnp.int32(15)).astype(jnp.uint8)
    codes = _pack_nibbles(nib, axis=-2)
    return codes, jnp.where(pos, scale, jnp.float32(0))


# ------------------------------------------------------------------ tree level

Targets = Union[None, str, Sequence[str], Callable[[str, Any], bool]]
_DEFAULT_TARGET = re.compile(r"(^|/)(kernel|weight)$")


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _check_kind(kind, block_size, group_size):
    if kind not in KINDS:
        raise ValueError(f"unknown quantization kind {kind!r}; use one of {KINDS}")
    if kind in ("nf4", "fp4"):
        if (not isinstance(block_size, (int, np.integer)) or block_size < 32 or block_size > 4096
                or block_size & (block_size - 1)):
            raise ValueError(
                f"block_size={block_size!r} is invalid for {kind}: use a power of two in 32..4096 "
                "(bitsandbytes supports 32, 64, ..., 4096; QLoRA uses 64)")
    else:
        if not isinstance(group_size, (int, np.integer)) or group_size < 1:
            raise ValueError(f"group_size={group_size!r} is invalid for int4: use a positive int "
                             "(default 128, clamped to the in dimension)")


def quantize_array(w, kind: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
                   group_size: int = 128, stack_ndim: int = 0, in_ndim: int = 1,
                   path: str = "<array>") -> QuantizedWeight:
    """Quantize one kernel ``[*S, *I, *O]`` (S = ``stack_ndim`` axes, I = ``in_ndim`` axes)."""
    _check_kind(kind, block_size, group_size)
    shape = tuple(w.shape)
    dtype = getattr(w, "dtype", None)
    if dtype is None or not _is_float(dtype):
        raise ValueError(f"leaf {path!r} has dtype {dtype}; only float leaves can be quantized. "
                         "Narrow `targets` so it does not match this leaf.")
    s, i = int(stack_ndim), int(in_ndim)
    if s < 0 or i < 1 or s + i >= len(shape):
        raise ValueError(
            f"leaf {path!r} of shape {shape} cannot be quantized with stack_ndim={s}, in_ndim={i}: "
            "a kernel needs at least one input and one output axis (biases, norms and other "
            "1-D leaves are not quantized). Narrow `targets` or pass `layout=`.")
    if math.prod(shape) == 0:
        raise ValueError(f"leaf {path!r} of shape {shape} is empty; exclude it from `targets`.")
    layer_shape = shape[s:]
    k = math.prod(shape[s:s + i])
    common = dict(layer_shape=layer_shape, in_ndim=i, dtype=np.dtype(dtype))
    if kind == "int4":
        g = min(int(group_size), k)
        kp = -(-k // g) * g
        codes, scales = _quantize_int4(jnp.asarray(w), group_size=g, s=s, i=i)
        return QuantizedWeight(codes=codes, scales=scales, kind="int4", block_size=0,
                               group_size=g, padded_in=kp, **common)
    codes, sc, nested, offset = _quantize_4bit(
        jnp.asarray(w), kind=kind, block_size=int(block_size), double_quant=bool(double_quant),
        s=s, i=i)
    return QuantizedWeight(codes=codes, scales=sc, nested_scales=nested, offset=offset,
                           kind=kind, block_size=int(block_size), **common)


def _target_rules(targets: Targets):
    """List of (description, predicate(path, leaf))."""
    if targets is None:
        def default(path, leaf):
            return bool(_DEFAULT_TARGET.search(path)) and len(getattr(leaf, "shape", ())) >= 2
        return [("default (paths ending in 'kernel' or 'weight', ndim >= 2)", default)], True
    if isinstance(targets, str):
        targets = [targets]
    if callable(targets):
        fn = targets
        return [(f"predicate {getattr(fn, '__name__', fn)!r}", lambda p, l: bool(fn(p, l)))], False
    rules = []
    for t in targets:
        if not isinstance(t, str):
            raise ValueError(f"targets must be a regex, a list of regexes or a predicate(path, leaf); "
                             f"got element {t!r}")
        rx = re.compile(t)
        rules.append((f"regex {t!r}", lambda p, l, rx=rx: bool(rx.search(p))))
    return rules, False


def quantize(params, kind: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
             targets: Targets = None, layout: LayoutSpec = None, group_size: int = 128):
    """Return ``params`` with targeted float kernels replaced by :class:`QuantizedWeight`.

    Pure: the input tree is not modified. ``targets``: ``None`` (leaves whose
    path ends in ``kernel`` or ``weight`` with ndim >= 2 -- not embeddings,
    norms or biases), a regex or list of regexes searched in the '/'-joined key
    path, or ``predicate(path_str, leaf)``. Every rule must match at least one
    leaf. ``layout`` resolves (stack_ndim, in_ndim) per leaf as in
    ``lora_jax._layout``. A ``LoraWeight`` whose path matches has its ``w0``
    quantized; existing ``QuantizedWeight`` nodes are left as they are.
    """
    _check_kind(kind, block_size, group_size)
    rules, is_default = _target_rules(targets)
    hits = [0] * len(rules)

    def visit(path, leaf):
        p = path_str(path)
        base = leaf.w0 if isinstance(leaf, LoraWeight) else leaf
        if base is None or not hasattr(base, "shape"):
            return leaf
        matched = False
        for j, (_, pred) in enumerate(rules):
            if pred(p, base):
                hits[j] += 1
                matched = True
        if not matched or isinstance(base, ImplicitArray):   # already quantized: keep
            return leaf
        if is_default and not _is_float(base.dtype):
            return leaf
        if not _is_float(base.dtype):
            raise ValueError(f"leaf {p!r} has dtype {base.dtype}; only float leaves can be "
                             "quantized. Narrow `targets` so it does not match this leaf.")
        if base.ndim < 2:
            raise ValueError(f"leaf {p!r} of shape {tuple(base.shape)} is not a kernel (ndim < 2); "
                             "biases, norms and other 1-D leaves are not quantized. Narrow `targets`.")
        if isinstance(leaf, LoraWeight):
            s, i = leaf.stack_ndim, leaf.in_ndim
        else:
            s, i = resolve_layout(layout, p, base)
        q = quantize_array(base, kind, block_size=block_size, double_quant=double_quant,
                           group_size=group_size, stack_ndim=s, in_ndim=i, path=p)
        return dataclasses.replace(leaf, w0=q) if isinstance(leaf, LoraWeight) else q

    out = jax.tree_util.tree_map_with_path(visit, params, is_leaf=lambda x: isinstance(x, ImplicitArray))
    for (desc, _), h in zip(rules, hits):
        if h == 0:
            raise ValueError(f"quantize targets rule {desc} matched no leaf; check the key paths "
                             "(lora_jax uses '/'-joined paths such as 'layers/q_proj/kernel').")
    return out


def dequantize(tree):
    """Replace every QuantizedWeight (also inside LoraWeight.w0) by its dense array."""
    def visit(x):
        if isinstance(x, QuantizedWeight):
            return x.materialize()
        if isinstance(x, LoraWeight) and isinstance(x.w0, QuantizedWeight):
            return dataclasses.replace(x, w0=x.w0.materialize())
        return x
    return jax.tree_util.tree_map(visit, tree, is_leaf=lambda x: isinstance(x, ImplicitArray))


def bits_per_param(tree) -> dict:
    """Storage of quantized weights in bits per quantized parameter.

    Counts every array leaf of the QuantizedWeight nodes (packed codes, scales,
    double-quant state); the shared code tables are constants and not counted.
    Returns ``{"bits_per_param", "quantized_params", "quantized_bytes",
    "by_kind": {kind: {...}}, "unquantized_leaves", "unquantized_params",
    "unquantized_bytes"}``.
    """
    by_kind: dict[str, dict] = {}
    qp = qb = 0
    up = ub = ul = 0

    def visit(x):
        nonlocal qp, qb, up, ub, ul
        if isinstance(x, QuantizedWeight):
            n, b = x.size, x.nbytes
            qp += n
            qb += b
            d = by_kind.setdefault(x.kind, {"params": 0, "bytes": 0, "leaves": 0})
            d["params"] += n
            d["bytes"] += b
            d["leaves"] += 1
            return
        if isinstance(x, ImplicitArray):
            for leaf in jax.tree_util.tree_leaves(x, is_leaf=is_quantized):
                visit(leaf)
            return
        if x is None or not hasattr(x, "shape"):
            return
        ul += 1
        up += int(math.prod(x.shape))
        ub += _nbytes(x)

    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, ImplicitArray)):
        visit(leaf)
    for d in by_kind.values():
        d["bits_per_param"] = 8.0 * d["bytes"] / d["params"] if d["params"] else 0.0
    return {
        "bits_per_param": 8.0 * qb / qp if qp else 0.0,
        "quantized_params": qp,
        "quantized_bytes": qb,
        "by_kind": by_kind,
        "unquantized_leaves": ul,
        "unquantized_params": up,
        "unquantized_bytes": ub,
    }


# ------------------------------------------------------ bitsandbytes interop

_TORCH_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}


def _dtype_name(dtype) -> str:
    d = np.dtype(jnp.dtype(dtype))
    if d == np.dtype(jnp.bfloat16):
        return "bfloat16"
    if d in (np.dtype(np.float16), np.dtype(np.float32)):
        return d.name
    raise ValueError(f"bitsandbytes stores float32, float16 or bfloat16 weights, not {d}")


def from_bnb_state(tensors: Mapping[str, Any], prefix: str, *, in_ndim: int = 1, dtype=None,
                   shape: Optional[Sequence[int]] = None) -> QuantizedWeight:
    """Load a bitsandbytes 4-bit weight as transformers stores it in safetensors.

    ``tensors`` maps names to arrays (e.g. ``safetensors.numpy.load_file``);
    ``prefix`` is the module prefix including the trailing dot
    (``"model.layers.0.self_attn.q_proj."``). Reads ``{prefix}weight`` (packed
    uint8), ``weight.absmax``, ``weight.quant_map``, optional
    ``weight.nested_absmax``/``weight.nested_quant_map`` and the JSON in
    ``weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``), without
    requantizing. The torch weight is (out, in); the node's logical shape is
    the Flax (in, out) unless ``shape`` (``(*I, *O)``, with ``in_ndim`` input
    axes) is given. ``dtype`` defaults to the dtype recorded by bitsandbytes.
    """
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
    bs = int(meta["blocksize"])
    _check_kind(kind, bs, 1)
    qmap = np.asarray(tensors[w + ".quant_map"], np.float32).reshape(-1)
    if qmap.shape != (16,) or not np.array_equal(qmap.view(np.uint32), _code(kind).view(np.uint32)):
        raise ValueError(f"{w + '.quant_map'!r} is not bitsandbytes' standard {kind} table; "
                         "custom 4-bit code tables are not supported")
    torch_shape = tuple(int(v) for v in meta["shape"])
    if len(torch_shape) != 2:
        raise ValueError(f"{w!r}: expected a 2-D (out, in) weight, got shape {torch_shape}")
    out_f, in_f = torch_shape
    if shape is None:
        if in_ndim != 1:
            raise ValueError("pass shape=(*I, *O) when in_ndim != 1")
        layer_shape = (in_f, out_f)
    else:
        layer_shape = tuple(int(v) for v in shape)
        if (math.prod(layer_shape[:in_ndim]) != in_f or math.prod(layer_shape[in_ndim:]) != out_f
                or in_ndim < 1 or in_ndim >= len(layer_shape)):
            raise ValueError(f"shape={layer_shape} with in_ndim={in_ndim} does not match the "
                             f"bitsandbytes (out, in) shape {torch_shape}")
    n = out_f * in_f
    raw = np.asarray(tensors[w])
    codes = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    nb = -(-n // bs)
    if codes.size != (n + 1) // 2:
        raise ValueError(f"{w!r} holds {codes.size} bytes; shape {torch_shape} needs {(n + 1) // 2}")
    if dtype is None:
        dtype = _TORCH_DTYPES[meta["dtype"]]
    absmax = np.asarray(tensors[w + ".absmax"]).reshape(-1)
    if absmax.size != nb:
        raise ValueError(f"{w + '.absmax'!r} holds {absmax.size} values; expected {nb}")
    nested = offset = None
    nested_code = None
    nested_bs = NESTED_BLOCK
    if w + ".nested_absmax" in tensors:
        nested_bs = int(meta["nested_blocksize"])
        nested = np.asarray(tensors[w + ".nested_absmax"], np.float32).reshape(-1)
        offset = np.asarray(meta["nested_offset"], np.float32)
        absmax = absmax.astype(np.uint8)
        nmap = np.asarray(tensors[w + ".nested_quant_map"], np.float32).reshape(-1)
        if nmap.shape != (256,):
            raise ValueError(f"{w + '.nested_quant_map'!r} must hold 256 values")
        if not np.array_equal(nmap.view(np.uint32), dynamic_map().view(np.uint32)):
            nested_code = tuple(float(v) for v in nmap)
        if nested.size != -(-nb // nested_bs):
            raise ValueError(f"{w + '.nested_absmax'!r} has {nested.size} values; expected "
                             f"{-(-nb // nested_bs)}")
    else:
        absmax = absmax.astype(np.float32)
    return QuantizedWeight(
        codes=jnp.asarray(codes), scales=jnp.asarray(absmax),
        nested_scales=None if nested is None else jnp.asarray(nested),
        offset=None if offset is None else jnp.asarray(offset),
        kind=kind, block_size=bs, layer_shape=layer_shape, in_ndim=int(in_ndim),
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
    meta: dict[str, Any] = {
        "quant_type": q.kind,
        "blocksize": q.block_size,
        "dtype": _dtype_name(q.dtype),
        "shape": [q.out_features, q.in_features],
    }
    if q.double_quant:
        out[w + ".absmax"] = np.asarray(q.scales, np.uint8).reshape(-1)
        out[w + ".quant_map"] = np.array(_code(q.kind), np.float32)
        out[w + ".nested_absmax"] = np.asarray(q.nested_scales, np.float32).reshape(-1)
        nmap = dynamic_map() if q.nested_code is None else np.asarray(q.nested_code, np.float32)
        out[w + ".nested_quant_map"] = np.array(nmap, np.float32)
        meta.update({"nested_blocksize": q.nested_block_size, "nested_dtype": "float32",
                     "nested_offset": float(np.asarray(q.offset, np.float32))})
    else:
        out[w + ".absmax"] = np.asarray(q.scales, np.float32).reshape(-1)
        out[w + ".quant_map"] = np.array(_code(q.kind), np.float32)
    out[w + ".quant_state.bitsandbytes__" + q.kind] = np.frombuffer(
        json.dumps(meta).encode("utf-8"), np.uint8).copy()
    return out
