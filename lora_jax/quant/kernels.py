"""Quantize and dequantize kernels on ``[*S, K, N]`` matrices (``jnp`` only; traceable).

S are stacked-layer axes carried through untouched, K = prod(input axes),
N = prod(output axes). The 4-bit kinds work on bitsandbytes' flat run: the
torch-oriented ``(N, K)`` matrix flattened row-major and cut into blocks.

Numerics notes. XLA flushes float32 subnormals to zero on CPU and contracts
``a*b + c`` into an FMA inside fusions; both are handled so that quantize and
dequantize reproduce bitsandbytes bit-for-bit on normal-range inputs (the
double-quant dequantization ``code*nested + offset`` is kept unfused by a
``where``; subnormal weights are treated as zero).

Example:
    >>> import jax.numpy as jnp
    >>> codes, am, _, _ = quantize_4bit(jnp.ones((5, 7)), kind="nf4", block_size=32,
    ...                                 double_quant=False)
    >>> codes.shape, am.shape, float(dequantize_4bit(codes, am, "nf4", 32, 35)[0])
    ((18,), (2,), 1.0)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.quant.codes import (
    INT4_VALUES,
    NESTED_BLOCK,
    bounds_order,
    code,
    dynamic_map,
    pair_table,
)

# bitsandbytes stores clamp(absmax, 1e-38) for an all-zero partial last block.
_TINY_BITS = np.float32(1e-38).view(np.uint32)


def _pad_last(x, length: int, axis: int = -1):
    """``x`` cut or zero-padded along ``axis`` to ``length``."""
    x = jnp.moveaxis(x, axis, -1)
    n = x.shape[-1]
    if n >= length:
        x = x[..., :length]
    else:
        x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (length - n,), x.dtype)], axis=-1)
    return jnp.moveaxis(x, -1, axis)


def bucketize(x, bounds: np.ndarray):
    """#{bounds < x}: torch.bucketize(x, bounds) (right=False), i.e. ties go to the lower code."""
    if len(bounds) <= 32:
        acc = jnp.zeros(x.shape, jnp.int32)
        for b in bounds.tolist():
            acc = acc + (x > jnp.float32(b)).astype(jnp.int32)
        return acc
    return jnp.searchsorted(jnp.asarray(bounds), x, side="left").astype(jnp.int32)


def blockwise_absmax(x, bs: int, partial_like_4bit: bool = True):
    """bnb's blockwise absmax and clamp(x/absmax) for x [*S, n] float32.

    Returns (scaled [*S, nb*bs] zero padded, absmax [*S, nb]).
    """
    sshape, n = x.shape[:-1], x.shape[-1]
    nb = -(-n // bs)
    full, rem = n // bs, n % bs
    xb = _pad_last(x, nb * bs).reshape(sshape + (nb, bs))
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


def pack_nibbles(q, axis: int = -1):
    """uint8 codes in [0, 16) -> bytes, pairs along ``axis``, first element high nibble."""
    q = jnp.moveaxis(q, axis, -1)
    q = _pad_last(q, q.shape[-1] + q.shape[-1] % 2)
    q = q.reshape(q.shape[:-1] + (q.shape[-1] // 2, 2)).astype(jnp.uint8)
    packed = (q[..., 0] << jnp.uint8(4)) | q[..., 1]
    return jnp.moveaxis(packed, -1, axis)


def lookup(table: np.ndarray, idx):
    """``table[idx]`` for a constant table, keeping an explicit-axes sharding of ``idx``
    (plain indexing cannot place the result: the table lives on no mesh)."""
    idx = idx.astype(jnp.int32)
    table = jnp.asarray(table)
    sharding = getattr(jax.typeof(idx), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    spec = tuple(getattr(sharding, "spec", ()))
    if mesh is None or mesh.empty or all(e is None for e in spec):
        return table[idx]
    spec = spec + (None,) * (idx.ndim - len(spec) + table.ndim - 1)
    return table.at[idx].get(out_sharding=NamedSharding(mesh, P(*spec)))


def _unpack(codes, values: np.ndarray):
    """Packed bytes [..., m] -> float32 values [..., m, 2] (high nibble first)."""
    return lookup(pair_table(values), codes)


# ----------------------------------------------------------------------------- nf4 / fp4


@functools.partial(jax.jit, static_argnames=("kind", "block_size", "double_quant"))
def quantize_4bit(m, *, kind: str, block_size: int, double_quant: bool):
    """[*S, K, N] -> (codes uint8 [*S, ceil(K*N/2)], scales, nested_scales, offset).

    ``scales`` is the float32 absmax [*S, nblocks], or with ``double_quant`` its
    uint8 codes, ``nested_scales`` float32 [*S, ceil(nblocks/256)] and
    ``offset`` float32 [*S] (both None without double quant).
    """
    sshape, (k, n_out) = m.shape[:-2], m.shape[-2:]
    x = jnp.swapaxes(m.astype(jnp.float32), -1, -2).reshape(sshape + (k * n_out,))
    scaled, am = blockwise_absmax(x, block_size)
    n = k * n_out
    scaled = scaled[..., : n + n % 2]   # an odd tail nibble encodes 0.0, as bnb pads
    bounds, order = bounds_order(kind)
    q = bucketize(scaled, bounds)
    if kind != "nf4":
        q = lookup(order, q)
    codes = pack_nibbles(q.astype(jnp.uint8))
    if not double_quant:
        return codes, am, None, None
    qa, nested, offset = double_quant_absmax(am)
    return codes, qa, nested, offset


def double_quant_absmax(am):
    """absmax [*S, nb] -> (uint8 codes, nested float32 absmax [*S, nb2], offset [*S])."""
    offset = jnp.mean(am, axis=-1)
    a = am - jnp.expand_dims(offset, -1)
    nb = a.shape[-1]
    # bitsandbytes' 8-bit CPU kernel (quantize_blockwise) treats every block alike.
    scaled, nested = blockwise_absmax(a, NESTED_BLOCK, partial_like_4bit=False)
    table = dynamic_map()
    bounds = ((table[:-1] + table[1:]) / np.float32(2.0)).astype(np.float32)
    q = bucketize(scaled[..., :nb], bounds)
    # bitsandbytes' CPU kernel emits code 0 in a block whose absmax is 0 (its 0/0
    # goes to the first code); the value dequantizes to 0 either way.
    zero = jnp.repeat(nested == jnp.float32(0), NESTED_BLOCK, axis=-1)[..., :nb]
    q = jnp.where(zero, jnp.int32(0), q).astype(jnp.uint8)
    return q, nested, offset


def dequantize_absmax(q, nested, offset, nested_block_size: int = NESTED_BLOCK,
                      nested_code=None):
    """uint8 absmax codes [*S, nb] -> float32 absmax (undoes :func:`double_quant_absmax`)."""
    nb, nb2, bs2 = q.shape[-1], nested.shape[-1], nested_block_size
    table = dynamic_map() if nested_code is None else np.asarray(nested_code, np.float32)
    vals = _pad_last(lookup(table, q), nb2 * bs2)
    vals = vals.reshape(vals.shape[:-1] + (nb2, bs2))
    prod = vals * jnp.expand_dims(jnp.asarray(nested, jnp.float32), -1)
    # Keep XLA from contracting prod + offset into an FMA (bitsandbytes rounds
    # the product, then the sum); a select between them blocks the contraction.
    prod = jnp.where(jnp.isnan(vals), vals, prod)
    prod = prod.reshape(prod.shape[:-2] + (nb2 * bs2,))[..., :nb]
    return prod + jnp.expand_dims(jnp.asarray(offset, jnp.float32), -1)


def dequantize_4bit(codes, absmax, kind: str, block_size: int, n: int):
    """Packed codes [*S, ceil(n/2)] and absmax [*S, nb] -> float32 flat run [*S, n]."""
    sshape = codes.shape[:-1]
    nb = absmax.shape[-1]
    vals = _unpack(codes, code(kind)).reshape(sshape + (2 * codes.shape[-1],))
    vals = _pad_last(vals, nb * block_size).reshape(sshape + (nb, block_size))
    out = vals * jnp.expand_dims(absmax, -1)
    return out.reshape(sshape + (nb * block_size,))[..., :n]


# ----------------------------------------------------------------------------- int4


@functools.partial(jax.jit, static_argnames=("group_size",))
def quantize_int4(m, *, group_size: int):
    """[*S, K, N] -> (codes uint8 [*S, ceil(Kp/2), N], scales float32 [*S, Kp/g, N]).

    Symmetric: ``scale = absmax(group) / 7`` per group of ``group_size`` rows of K
    and per column; K is zero-padded to Kp, a multiple of the group size.
    """
    sshape, (k, n_out) = m.shape[:-2], m.shape[-2:]
    g = group_size
    kp = -(-k // g) * g
    x = _pad_last(m.astype(jnp.float32), kp, axis=-2)
    xg = x.reshape(sshape + (kp // g, g, n_out))
    scale = jnp.max(jnp.abs(xg), axis=-2) / jnp.float32(7.0)
    pos = scale > jnp.float32(0)
    safe = jnp.where(pos, scale, jnp.float32(1))
    q = jnp.round(xg / jnp.expand_dims(safe, -2))
    q = jnp.clip(q, jnp.float32(-7), jnp.float32(7)).astype(jnp.int32)
    q = jnp.where(jnp.expand_dims(pos, -2), q, jnp.int32(0))
    nib = (q.reshape(sshape + (kp, n_out)) & jnp.int32(15)).astype(jnp.uint8)
    return pack_nibbles(nib, axis=-2), jnp.where(pos, scale, jnp.float32(0))


def dequantize_int4(codes, scales, group_size: int, k: int):
    """int4 codes [*S, Kp/2, N] and scales [*S, Kp/g, N] -> float32 [*S, K, N]."""
    sshape, n = codes.shape[:-2], codes.shape[-1]
    g = group_size
    pairs = _unpack(codes, INT4_VALUES)                                    # [*S, Kp/2, N, 2]
    vals = jnp.swapaxes(pairs, -1, -2).reshape(sshape + (2 * codes.shape[-2], n))
    kp = scales.shape[-2] * g
    vals = vals[..., :kp, :].reshape(sshape + (kp // g, g, n))
    out = vals * jnp.expand_dims(jnp.asarray(scales, jnp.float32), -2)
    return out.reshape(sshape + (kp, n))[..., :k, :]
