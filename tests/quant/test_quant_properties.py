"""Property tests: every finite weight round-trips within the bound its code table implies,
and every non-finite weight is refused with its leaf path.

The bound, per element, from the tables themselves (not a tuned tolerance):

* nf4 / fp4: ``x / A`` (A = the block's absmax) goes to the nearest code value, so the error
  is at most ``h4 * A`` with ``h4`` the largest half gap between adjacent sorted codes (or
  the distance from +-1 to the table's ends, whichever is larger).
* double quant: A itself is stored as ``mean + N * c8`` with ``c8`` from the 8-bit dynamic
  map (N = max |A - mean| over its 256-block); that adds ``h8 * N`` (|code| <= 1).
* int4: ``q = round(x / s)``, ``s = A_group / 7``: at most ``h * s`` with ``h`` half the
  gap between the integer codes (1/2).

Each also gets float32 rounding slack: a few ulps of every magnitude in the computation,
and an absolute floor of a few ``tiny`` (the smallest normal float32): XLA on CPU flushes
subnormal results to zero, so a weight near 1e-38 may dequantize to 0.
"""

import hypothesis.extra.numpy as hnp
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_jax as lj
from lora_jax.quant import NF4_CODE, dynamic_map
from lora_jax.quant.codes import FP4_CODE, INT4_VALUES, NESTED_BLOCK

EPS = float(np.finfo(np.float32).eps)
FLOOR = 8 * float(np.finfo(np.float32).tiny)
SIZES = st.sampled_from([1, 3, 7, 33])                   # few shapes: few compilations
SETTINGS = settings(max_examples=20, deadline=None)


def half_gap(table) -> float:
    """The largest distance from a point of [-1, 1] to its nearest table value."""
    s = np.sort(np.asarray(table, np.float64))
    return float(max(np.diff(s).max() / 2, 1.0 - s[-1], s[0] + 1.0))


def _weights(draw):
    k, n = draw(SIZES), draw(SIZES)
    base = draw(hnp.arrays(np.float32, (k, n), elements=st.floats(
        -1.0, 1.0, width=32, allow_subnormal=False)))
    scale = np.float32(10.0 ** draw(st.integers(-3, 3)))
    return base * scale


@st.composite
def cases_4bit(draw):
    return (_weights(draw), draw(st.sampled_from(["nf4", "fp4"])), draw(st.sampled_from([32, 64])),
            draw(st.booleans()), draw(st.sampled_from([(0,), (1,)])))


def _torch_flat(w, in_axes):
    """The (out, in) matrix bitsandbytes blocks, flattened row-major."""
    return (w.T if in_axes == (0,) else w).reshape(-1).astype(np.float64)


def bound_4bit(w, kind, block_size, double_quant, in_axes):
    flat = _torch_flat(w, in_axes)
    nb = -(-flat.size // block_size)
    padded = np.zeros(nb * block_size)
    padded[: flat.size] = np.abs(flat)
    absmax = padded.reshape(nb, block_size).max(axis=1)                  # A per block
    per_block = (half_gap(NF4_CODE if kind == "nf4" else FP4_CODE) * absmax + 4 * EPS * absmax
                 + FLOOR)
    if double_quant:
        mean = absmax.mean()
        dev = np.abs(absmax - mean)
        n2 = -(-nb // NESTED_BLOCK)
        dpad = np.zeros(n2 * NESTED_BLOCK)
        dpad[:nb] = dev
        nested = np.repeat(dpad.reshape(n2, NESTED_BLOCK).max(axis=1), NESTED_BLOCK)[:nb]
        per_block += half_gap(dynamic_map()) * nested + 8 * EPS * (absmax + nested + abs(mean))
    bound = np.repeat(per_block, block_size)[: flat.size]
    out_in = bound.reshape(w.T.shape if in_axes == (0,) else w.shape)
    return out_in.T if in_axes == (0,) else out_in


@SETTINGS
@given(cases_4bit())
def test_nf4_fp4_round_trip_within_the_code_bound(case):
    w, kind, block_size, double_quant, in_axes = case
    q = lj.quantize({"layer": {"kernel": jnp.asarray(w)}}, kind, block_size=block_size,
                    double_quant=double_quant, layout={"kernel": (0, in_axes)})
    back = np.asarray(q["layer"]["kernel"].materialize(), np.float64)
    err = np.abs(back - w.astype(np.float64))
    bound = bound_4bit(w, kind, block_size, double_quant, in_axes)
    assert (err <= bound).all(), float((err - bound).max())


@st.composite
def cases_int4(draw):
    return _weights(draw), draw(st.integers(1, 9)), draw(st.sampled_from([(0,), (1,)]))


@SETTINGS
@given(cases_int4())
def test_int4_round_trip_within_half_a_step(case):
    w, group_size, in_axes = case
    q = lj.quantize({"layer": {"kernel": jnp.asarray(w)}}, "int4", group_size=group_size,
                    layout={"kernel": (0, in_axes)})
    back = np.asarray(q["layer"]["kernel"].materialize(), np.float64)
    m = (w if in_axes == (0,) else w.T).astype(np.float64)                  # [K, N]
    k = m.shape[0]
    g = min(group_size, k)
    groups = -(-k // g)
    padded = np.zeros((groups * g, m.shape[1]))
    padded[:k] = np.abs(m)
    step = padded.reshape(groups, g, -1).max(axis=1) / 7.0                   # s per group
    used = np.sort(INT4_VALUES[np.abs(INT4_VALUES) <= 7])
    h = np.diff(used).max() / 2
    bound = np.repeat(h * step + 4 * EPS * 7 * step + FLOOR, g, axis=0)[:k]
    bound = bound if in_axes == (0,) else bound.T
    err = np.abs(back - w.astype(np.float64))
    assert (err <= bound).all(), float((err - bound).max())


@st.composite
def cases_non_finite(draw):
    w = _weights(draw)
    i, j = draw(st.integers(0, w.shape[0] - 1)), draw(st.integers(0, w.shape[1] - 1))
    w[i, j] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return w, (i, j), draw(st.sampled_from(["nf4", "fp4", "int4"])), draw(st.booleans())


@SETTINGS
@given(cases_non_finite())
def test_non_finite_weights_are_refused_naming_the_leaf(case):
    w, (i, j), kind, double_quant = case
    with pytest.raises(ValueError, match=rf"'layer/kernel' holds 1 non-finite .* \({i}, {j}\)"):
        lj.quantize({"layer": {"kernel": jnp.asarray(w)}}, kind, double_quant=double_quant,
                    block_size=32, group_size=4)


def test_half_gap_reads_the_tables():
    """The bounds above rest on these: NF4's widest gap is -1 -> -0.6962, FP4's 2/3 -> 1."""
    assert half_gap(NF4_CODE) == pytest.approx((1.0 - 0.6961928009986877) / 2)
    assert half_gap(FP4_CODE) == pytest.approx((1.0 - 8.0 / 12.0) / 2)
    assert half_gap(dynamic_map()) < 0.0071
