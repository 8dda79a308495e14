"""The code tables: bitsandbytes' NF4 and FP4 values, its 8-bit dynamic map, int4's.

Every table is float32 and bit-identical to the one bitsandbytes builds, so
quantized bytes and dequantized values match it exactly.

Example:
    >>> float(NF4_CODE[0]), float(NF4_CODE[7]), float(NF4_CODE[15])
    (-1.0, 0.0, 1.0)
    >>> float(FP4_CODE[3]) == 1.0 and dynamic_map().shape == (256,)
    True
"""

from __future__ import annotations

import functools

import numpy as np

KINDS = ("nf4", "fp4", "int4")
NESTED_BLOCK = 256     # absmax values per block of double quantization

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

# int4 nibbles are two's complement: 0..7, then -8..-1.
INT4_VALUES = np.array([v if v < 8 else v - 16 for v in range(16)], dtype=np.float32)
INT4_VALUES.setflags(write=False)


def code(kind: str) -> np.ndarray:
    """The 16 float32 values of a 4-bit ``kind`` ("nf4" or "fp4"), in code order."""
    return NF4_CODE if kind == "nf4" else FP4_CODE


@functools.lru_cache(maxsize=None)
def bounds_order(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Midpoints between the sorted code values, and the sorted-position -> code map."""
    values = code(kind)
    order = np.argsort(values, kind="stable")
    s = values[order]
    bounds = (s[:-1] + s[1:]) / np.float32(2.0)
    return bounds.astype(np.float32), order.astype(np.uint8)


def pair_table(values: np.ndarray) -> np.ndarray:
    """[256, 2] float32: the two values a packed byte stands for (high nibble first)."""
    b = np.arange(256)
    return np.stack([values[b >> 4], values[b & 15]], axis=-1).astype(np.float32)


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


def _bin_means(n: int, scale: np.float32, signed: bool) -> list[float]:
    bd = _torch_linspace_f32(0.1, 1.0, n)
    means = (bd[:-1] + bd[1:]) / np.float32(2.0)
    out = (scale * means).tolist()
    return out + (-scale * means).tolist() if signed else out


@functools.lru_cache(maxsize=None)
def _dynamic_map_cached(signed: bool, max_exponent_bits: int, total_bits: int) -> np.ndarray:
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        data += _bin_means(n, np.float32(10.0 ** (-(max_exponent_bits - 1) + i)), signed)
    if additional_items > 0:
        data += _bin_means(additional_items + 1,
                           np.float32(10.0 ** (-(max_exponent_bits - 1) + i)), signed)
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
