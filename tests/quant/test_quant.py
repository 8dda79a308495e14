"""NF4 / FP4 / int4 quantization: bitsandbytes parity, error bounds, pytree behaviour."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_jax.lora.weight import LoraWeight
from lora_jax.quant import (
    FP4_CODE,
    NF4_CODE,
    QuantizedWeight,
    bits_per_param,
    dequantize,
    dynamic_map,
    from_bnb_state,
    quantize,
    quantize_array,
    to_bnb_state,
)

DTYPES = {"float32": np.float32, "bfloat16": jnp.bfloat16, "float16": np.float16}


# ----------------------------------------------------------------- bnb oracle


@pytest.fixture(scope="module")
def bnb():
    bnb = pytest.importorskip("bitsandbytes")
    import torch
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True    # bnb's reference kernels would compile per shape
    yield bnb
    torch._dynamo.config.disable = old


def _torch(w_flax, dtype_name):
    import torch
    t = torch.from_numpy(np.asarray(w_flax, np.float32).T.copy())   # (in, out) -> torch (out, in)
    return t.to(getattr(torch, dtype_name))


def _bnb_dequant(bnb, p, s):
    """bitsandbytes' dequantization, as (in, out) float32 numpy.

    bnb 0.50's CPU C kernel (taken when the torch last dim is even) is wrong
    when blocks do not line up with rows (e.g. (20, 80) with blocksize 64, or
    blocksize > row): there bnb's own reference implementation is the oracle.
    """
    F = bnb.functional
    if s.shape[-1] % 2 == 0 and s.shape[-1] % s.blocksize != 0:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
        fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
        absmax = s.absmax
        if s.nested:
            absmax = F.dequantize_blockwise(s.absmax, s.state2) + s.offset
        out = fn(p.reshape(-1), absmax, _get_4bit_code(s.quant_type, p.device), s.blocksize,
                 s.shape, s.dtype)
    else:
        out = F.dequantize_4bit(p, s)
    return out.float().numpy().T


def test_code_tables_match_bitsandbytes(bnb):
    F = bnb.functional
    for kind, ours in (("nf4", NF4_CODE), ("fp4", FP4_CODE)):
        theirs = F.get_4bit_type(kind, device="cpu").numpy()
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), kind
    theirs = F.create_dynamic_map(signed=True).numpy()
    assert np.array_equal(dynamic_map().view(np.uint32), theirs.view(np.uint32))


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bnb_parity_random(bnb, kind, block_size, dtype):
    F = bnb.functional
    rng = np.random.default_rng(block_size)
    for shape in [(5, 7), (11, 13), (40, 24)]:      # odd sizes: partial last block, odd nibble
        w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, size=shape[1])).astype(np.float32)
        w = np.asarray(jnp.asarray(w, DTYPES[dtype]))
        p, s = F.quantize_4bit(_torch(w, dtype), blocksize=block_size, quant_type=kind)
        q = quantize_array(jnp.asarray(w), kind, block_size=block_size, double_quant=False)
        assert q.shape == shape and q.dtype == np.dtype(DTYPES[dtype])
        assert np.array_equal(np.asarray(q.codes), p.numpy().reshape(-1)), (shape, "codes")
        assert np.array_equal(np.asarray(q.scales), s.absmax.numpy()), (shape, "absmax")
        ref = _bnb_dequant(bnb, p, s)
        got = np.asarray(q.materialize().astype(jnp.float32))
        assert np.array_equal(got, ref), shape


def _edge_weight(kind, n_out=3):
    """Per (in=64) column: exact code points, exact midpoints and zeros, absmax 4."""
    code = np.sort((NF4_CODE if kind == "nf4" else FP4_CODE).astype(np.float32))
    mids = (code[:-1] + code[1:]) / np.float32(2)
    col = np.concatenate([code, mids, np.zeros(64 - 31, np.float32)]).astype(np.float32)
    cols = [col * np.float32(4.0), -col[::-1] * np.float32(2.0), np.zeros(64, np.float32)]
    return np.stack(cols[:n_out], axis=1)          # (in=64, out=3): each torch row is one block


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_bnb_parity_edges(bnb, kind):
    F = bnb.functional
    w = _edge_weight(kind)
    fp4_small = np.array([[1e-4, -1e-4, 0.002, -0.002, 0.0, 1.0, -1.0]], np.float32)  # fp4 ±0
    zeros = np.zeros((5, 7), np.float32)
    for arr, bs in ((w, 64), (w, 32), (w[:61], 64), (fp4_small, 32), (zeros, 32)):
        p, s = F.quantize_4bit(_torch(arr, "float32"), blocksize=bs, quant_type=kind)
        q = quantize_array(jnp.asarray(arr), kind, block_size=bs, double_quant=False)
        assert np.array_equal(np.asarray(q.codes), p.numpy().reshape(-1))
        assert np.array_equal(np.asarray(q.scales).view(np.uint32),
                              s.absmax.numpy().view(np.uint32))
        assert np.array_equal(np.asarray(q.materialize()), _bnb_dequant(bnb, p, s))


def test_ties_go_to_lower_code():
    code = NF4_CODE
    mid = (code[9] + code[10]) / np.float32(2)
    w = np.array([[1.0], [mid], [-1.0]], np.float32).T   # torch row [1, mid, -1] -> one block
    q = quantize_array(jnp.asarray(w.T), "nf4", block_size=32, double_quant=False)
    codes = np.asarray(q.codes)
    assert codes[0] >> 4 == 15 and codes[0] & 15 == 9 and codes[1] >> 4 == 0


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_bnb_double_quant(bnb, kind):
    F = bnb.functional
    rng = np.random.default_rng(3)
    for shape in [(5, 7), (130, 300), (260, 256)]:
        w = (rng.standard_normal(shape) * rng.uniform(0.1, 3.0, size=shape[1])).astype(np.float32)
        p, s = F.quantize_4bit(_torch(w, "float32"), blocksize=64, quant_type=kind,
                               compress_statistics=True)
        ref = _bnb_dequant(bnb, p, s)
        # our dequantization of bitsandbytes' stored state: exact, eager and jitted
        state = {"m.weight." + k: np.array(v.numpy()) for k, v in s.as_dict(packed=True).items()}
        state["m.weight"] = p.numpy()
        qb = from_bnb_state(state, "m.")
        assert qb.double_quant and qb.shape == shape
        assert np.array_equal(np.asarray(qb.materialize()), ref)
        assert np.array_equal(np.asarray(jax.jit(lambda q: q.materialize())(qb)), ref)
        # our double quantization: codes within one step, state close
        q = quantize_array(jnp.asarray(w), kind, block_size=64, double_quant=True)
        assert np.array_equal(np.asarray(q.codes), p.numpy().reshape(-1))
        ours, theirs = np.asarray(q.scales).astype(int), s.absmax.numpy().astype(int)
        assert np.abs(ours - theirs).max() <= 1
        np.testing.assert_allclose(float(q.offset), s.offset.item(), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(q.nested_scales), s.state2.absmax.numpy(), rtol=1e-6)


@pytest.mark.parametrize("dq", [False, True])
def test_bnb_state_roundtrip(bnb, tmp_path, dq):
    from safetensors.numpy import load_file, save_file
    F = bnb.functional
    rng = np.random.default_rng(4)
    w = rng.standard_normal((80, 20)).astype(np.float32)
    p, s = F.quantize_4bit(_torch(w, "bfloat16"), blocksize=64, quant_type="nf4",
                           compress_statistics=dq)
    state = {"model.layers.0.q_proj.weight." + k: v.numpy()
             for k, v in s.as_dict(packed=True).items()}
    state["model.layers.0.q_proj.weight"] = p.numpy()
    save_file(state, str(tmp_path / "m.safetensors"))
    loaded = load_file(str(tmp_path / "m.safetensors"))
    q = from_bnb_state(loaded, "model.layers.0.q_proj.")
    assert q.dtype == np.dtype(jnp.bfloat16) and q.shape == (80, 20) and q.double_quant == dq
    back = to_bnb_state(q, "model.layers.0.q_proj.")
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        assert back[k].tobytes() == v.tobytes(), k
    assert np.array_equal(np.asarray(q.materialize().astype(jnp.float32)), _bnb_dequant(bnb, p, s))
    # ours -> bnb: bitsandbytes reads what we write
    q2 = quantize_array(jnp.asarray(w, jnp.bfloat16), "fp4", block_size=128, double_quant=dq)
    out = to_bnb_state(q2, "x.")
    again = from_bnb_state(out, "x.")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
               zip(jax.tree_util.tree_leaves(q2), jax.tree_util.tree_leaves(again)))
    import torch
    from bitsandbytes.functional import QuantState
    qs = QuantState.from_dict({k[len("x.weight."):]: torch.from_numpy(np.array(v))
                               for k, v in out.items()
                               if k != "x.weight"}, device=torch.device("cpu"))
    theirs = _bnb_dequant(bnb, torch.from_numpy(np.array(out["x.weight"])), qs)
    np.testing.assert_array_equal(np.asarray(q2.materialize().astype(jnp.float32)), theirs)


def test_bnb_state_json_layout():
    q = quantize_array(jnp.ones((6, 4), jnp.float16), "nf4", block_size=64)
    st_ = to_bnb_state(q, "p.")
    meta = json.loads(bytes(st_["p.weight.quant_state.bitsandbytes__nf4"]))
    assert list(meta) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize",
                          "nested_dtype", "nested_offset"]
    assert meta["shape"] == [4, 6] and meta["dtype"] == "float16"
    assert st_["p.weight"].shape == (12, 1)
    with pytest.raises(ValueError, match="stacked"):
        to_bnb_state(quantize_array(jnp.ones((2, 6, 4)), "nf4", stack_ndim=1), "p.")
    with pytest.raises(ValueError, match="no bitsandbytes"):
        from_bnb_state(st_, "q.")


# ------------------------------------------------------------- error bounds


def _max_half_gap(kind):
    c = np.sort((NF4_CODE if kind == "nf4" else FP4_CODE).astype(np.float64))
    return float(np.max(np.diff(c)) / 2)


def _check_block_bound(w, q):
    """|x - deq(q(x))| <= absmax * max half gap, per block (torch row-major order)."""
    x = np.asarray(w, np.float32).reshape(-1, w.shape[-1]).T.reshape(-1)
    d = np.asarray(q.materialize().astype(jnp.float32)).reshape(-1, w.shape[-1]).T.reshape(-1)
    am = np.asarray(q.absmax())
    bs = q.block_size
    idx = np.arange(x.size) // bs
    bound = am[idx] * _max_half_gap(q.kind) * (1 + 1e-5) + 1e-30
    if q.double_quant:   # dequantized absmax differs from the true one by < one dyn-map step
        bound = bound + np.abs(x) * 0.02 + 1e-7
    assert np.all(np.abs(x - d) <= bound)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_roundtrip_error_bound(kind, dq):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((37, 29)).astype(np.float32) * np.float32(0.3)
    _check_block_bound(w, quantize_array(jnp.asarray(w), kind, block_size=32, double_quant=dq))


def test_int4_error_and_layout():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((130, 9)).astype(np.float32)
    q = quantize_array(jnp.asarray(w), "int4", group_size=64)
    assert q.group_size == 64 and q.padded_in == 192                 # zero-padded group layout
    assert q.codes.shape == (96, 9) and q.codes.dtype == jnp.uint8  # two codes per byte
    assert q.scales.shape == (3, 9)
    d = np.asarray(q.materialize())
    scale = np.repeat(np.asarray(q.scales), 64, axis=0)[:130]
    assert np.all(np.abs(w - d) <= scale / 2 * (1 + 1e-5) + 1e-12)
    codes = np.asarray(q.codes)
    nib = np.stack([codes >> 4, codes & 15], 1).reshape(-1, 9).astype(int)
    nib = np.where(nib >= 8, nib - 16, nib)
    assert nib.min() >= -7 and nib.max() <= 7 and np.all(nib[130:] == 0)
    small = quantize_array(jnp.asarray(w[:5]), "int4")               # group clamped to in=5
    assert small.group_size == 5 and small.scales.shape == (1, 9)


# --------------------------------------------------------- pytree behaviour


@pytest.mark.parametrize("kind,dq", [("nf4", True), ("fp4", False), ("int4", False)])
def test_stacked_per_layer_scan_vmap_jit(kind, dq):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 11, 13)).astype(np.float32)
    q = quantize_array(jnp.asarray(w), kind, block_size=32, double_quant=dq, stack_ndim=1)
    assert q.shape == (3, 11, 13) and q.stack_ndim == 1
    assert all(x.shape[0] == 3 for x in jax.tree_util.tree_leaves(q))
    full = np.asarray(q.materialize())
    for layer in range(3):
        ql = quantize_array(jnp.asarray(w[layer]), kind, block_size=32, double_quant=dq)
        sliced = jax.tree_util.tree_map(lambda x, layer=layer: x[layer], q)
        assert sliced.shape == (11, 13)
        for a, b in zip(jax.tree_util.tree_leaves(sliced), jax.tree_util.tree_leaves(ql)):
            if dq and a.dtype == jnp.float32:
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
            else:
                assert np.array_equal(np.asarray(a), np.asarray(b))
        assert np.array_equal(np.asarray(q[layer].materialize()), full[layer])
    jitted = jax.jit(lambda q: q.materialize())(q)
    assert np.array_equal(np.asarray(jitted), full)
    x = jnp.asarray(rng.standard_normal((2, 11)).astype(np.float32))

    def body(h, layer):
        assert layer.shape == (11, 13)
        return h, h @ layer.materialize()
    _, ys = jax.lax.scan(body, x, q)
    np.testing.assert_allclose(np.asarray(ys), np.einsum("bi,lio->lbo", np.asarray(x), full),
                               rtol=1e-5, atol=1e-5)
    vm = jax.vmap(lambda l: l.materialize())(q)
    assert np.array_equal(np.asarray(vm), full)


def test_astype_and_multi_axis_layout():
    rng = np.random.default_rng(8)
    w = rng.standard_normal((6, 4, 5)).astype(np.float32)    # DenseGeneral (d, heads, hd): I = 1
    q = quantize_array(jnp.asarray(w), "nf4", block_size=32, in_ndim=1)
    assert q.shape == (6, 4, 5)
    qb = q.astype(jnp.bfloat16)
    assert qb.dtype == jnp.bfloat16 and qb.materialize().dtype == jnp.bfloat16
    assert qb.codes is q.codes
    # torch orientation is (prod(O), prod(I)): same as quantizing the (6, 20) matrix
    q2 = quantize_array(jnp.asarray(w.reshape(6, 20)), "nf4", block_size=32)
    assert np.array_equal(np.asarray(q.codes), np.asarray(q2.codes))
    assert np.array_equal(np.asarray(q.materialize()).reshape(6, 20), np.asarray(q2.materialize()))


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int4"])
def test_in_axes_layouts_store_the_same_matrix(kind):
    """(out, in) and einsum-style weights: the stored (K, N) matrix is the (in, out) one."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((7, 11)).astype(np.float32)               # Flax (in=7, out=11)
    opts = dict(block_size=32, double_quant=False, group_size=4)
    flax = quantize_array(jnp.asarray(w), kind, **opts)
    eqx = quantize_array(jnp.asarray(w.T), kind, in_axes=(1,), **opts)  # Equinox (out, in)
    assert eqx.shape == (11, 7) and eqx.in_axes == (1,) and eqx.in_ndim == 1
    assert (eqx.in_features, eqx.out_features) == (7, 11)
    for a, b in zip(jax.tree_util.tree_leaves(flax), jax.tree_util.tree_leaves(eqx)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(eqx.materialize()), np.asarray(flax.materialize()).T)
    # Gemma-style einsum kernel (N=3, D=5, H=2) contracted on D, stacked twice.
    g = rng.standard_normal((2, 3, 5, 2)).astype(np.float32)
    qg = quantize_array(jnp.asarray(g), kind, stack_ndim=1, in_axes=(1,), **opts)
    canon = quantize_array(jnp.asarray(g.transpose(0, 2, 1, 3)), kind, stack_ndim=1, **opts)
    assert qg.shape == (2, 3, 5, 2) and canon.shape == (2, 5, 3, 2)
    assert np.array_equal(np.asarray(qg.codes), np.asarray(canon.codes))
    assert np.array_equal(np.asarray(qg.materialize()),
                          np.asarray(canon.materialize()).transpose(0, 2, 1, 3))
    assert np.array_equal(np.asarray(qg[1].materialize()), np.asarray(qg.materialize())[1])


def test_bnb_state_of_an_out_in_weight(bnb):
    """An Equinox (out, in) weight stores bitsandbytes' bytes for that torch weight."""
    import torch
    rng = np.random.default_rng(12)
    w = rng.standard_normal((11, 13)).astype(np.float32)              # torch (out, in)
    p, s = bnb.functional.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    q = quantize_array(jnp.asarray(w), "nf4", in_axes=(1,), double_quant=False)
    assert np.array_equal(np.asarray(q.codes), p.numpy().reshape(-1))
    assert np.array_equal(np.asarray(q.materialize()), _bnb_dequant(bnb, p, s).T)
    state = to_bnb_state(q, "m.")
    json_key = "m.weight.quant_state.bitsandbytes__nf4"
    assert json.loads(bytes(state[json_key]))["shape"] == [11, 13]
    back = from_bnb_state(state, "m.", in_axes=(1,))
    assert back.shape == (11, 13) and back.in_axes == (1,)
    assert from_bnb_state(state, "m.").shape == (13, 11)
    with pytest.raises(ValueError, match="does not match"):
        from_bnb_state(state, "m.", shape=(13, 12))


def test_quantize_layouts_from_fn():
    """fn= reads each weight's input axes off the function; targets default like lorafy's."""
    rng = np.random.default_rng(13)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    params = {"embed": f(9, 6), "proj": {"weight": f(5, 6)}, "einsum": {"w": f(3, 5, 2)}}

    def fn(p, ids):
        h = p["embed"][ids] @ p["proj"]["weight"].T                    # (out, in) matrix
        return jnp.einsum("bd,ndh->bnh", h, p["einsum"]["w"])          # contracted on D
    ids = jnp.array([1, 4, 8])
    q = quantize(params, "nf4", block_size=32, fn=fn, args=(ids,))
    assert q["proj"]["weight"].in_axes == (1,) and q["einsum"]["w"].in_axes == (1,)
    assert q["embed"] is params["embed"]                               # gathered, not contracted
    for path in (("proj", "weight"), ("einsum", "w")):
        w, d = params[path[0]][path[1]], dequantize(q)[path[0]][path[1]]
        bound = _max_half_gap("nf4") * float(jnp.abs(w).max()) * (1 + 1e-6)
        assert d.shape == w.shape and float(jnp.abs(d - w).max()) <= bound, path
    guessed = quantize(params, "nf4", block_size=32)
    assert guessed["proj"]["weight"].in_axes == (1,)                   # 'weight' = (out, in)
    assert guessed["einsum"]["w"].in_axes == (0,) and guessed["einsum"]["w"].stack_ndim == 1
    with pytest.raises(TypeError, match="fn must be callable"):
        quantize(params, fn="not a function")


def _params():
    rng = np.random.default_rng(9)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))
    return {
        "embed": {"embedding": f(50, 16)},
        "layers": {"attn": {"kernel": f(2, 16, 24), "bias": f(2, 24)},
                   "norm": {"scale": f(2, 16)}},
        "head": {"kernel": f(16, 50), "bias": f(50)},
        "conv": {"weight": f(3, 3, 4, 8)},
        "step": jnp.asarray(3, jnp.int32),
    }


def test_quantize_tree_default_targets():
    params = _params()
    q = quantize(params, "nf4")
    assert isinstance(q["layers"]["attn"]["kernel"], QuantizedWeight)
    assert q["layers"]["attn"]["kernel"].stack_ndim == 1
    assert isinstance(q["head"]["kernel"], QuantizedWeight)
    assert isinstance(q["conv"]["weight"], QuantizedWeight)
    assert q["embed"]["embedding"] is params["embed"]["embedding"]
    assert q["layers"]["attn"]["bias"] is params["layers"]["attn"]["bias"]
    assert not isinstance(params["head"]["kernel"], QuantizedWeight)      # pure
    d = dequantize(q)
    assert jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(params)
    np.testing.assert_allclose(np.asarray(d["head"]["kernel"]),
                               np.asarray(params["head"]["kernel"]),
                               atol=0.5)
    # regex list / predicate / already quantized
    q2 = quantize(params, "int4", targets=["head/kernel", r"attn/kernel$"])
    assert q2["head"]["kernel"].kind == "int4"
    assert not isinstance(q2["conv"]["weight"], QuantizedWeight)
    q3 = quantize(params, "fp4", targets=lambda p, leaf: p == "head/kernel")
    assert q3["head"]["kernel"].kind == "fp4"
    q4 = quantize(q, "nf4")
    assert q4["head"]["kernel"] is q["head"]["kernel"]


def test_quantize_lora_w0():
    rng = np.random.default_rng(10)
    w0 = rng.standard_normal((8, 6)).astype(np.float32)
    lw = LoraWeight(w0=jnp.asarray(w0), a=jnp.zeros((8, 2)), b=jnp.zeros((2, 6)), alpha=2.0)
    q = quantize({"dense": {"kernel": lw}}, "nf4")
    node = q["dense"]["kernel"]
    assert isinstance(node, LoraWeight) and isinstance(node.w0, QuantizedWeight)
    d = dequantize(q)["dense"]["kernel"]
    assert isinstance(d, LoraWeight) and d.w0.shape == (8, 6)
    # An (out, in) adapter's w0 is quantized with the adapter's own layout.
    lw_t = LoraWeight(w0=jnp.asarray(w0.T), a=jnp.zeros((8, 2)), b=jnp.zeros((2, 6)),
                      alpha=2.0, in_axes=(1,))
    qt = quantize({"dense": {"weight": lw_t}}, "nf4", layout={"dense": (0, (0,))})
    assert qt["dense"]["weight"].w0.in_axes == (1,)
    assert np.array_equal(np.asarray(qt["dense"]["weight"].w0.codes), np.asarray(node.w0.codes))


def test_errors():
    params = _params()
    with pytest.raises(ValueError, match="unknown quantization kind"):
        quantize(params, "nf3")
    for bs in (16, 100, 8192):
        with pytest.raises(ValueError, match="power of two"):
            quantize(params, "nf4", block_size=bs)
    with pytest.raises(ValueError, match="group_size"):
        quantize(params, "int4", group_size=0)
    with pytest.raises(ValueError, match="'step'.*float"):
        quantize(params, targets=["head/kernel", "step"])
    with pytest.raises(ValueError, match="head/bias.*ndim < 2"):
        quantize(params, targets=[r"head/"])
    with pytest.raises(ValueError, match="nomatch"):
        quantize(params, targets=["head/kernel", "nomatch"])
    with pytest.raises(ValueError, match="no leaf matches the default targets"):
        quantize({"embed": {"embedding": jnp.ones((4, 4))}})
    with pytest.raises(ValueError, match="'head/kernel'.*in_axes"):
        quantize(params, targets="head/kernel", layout={"head": (0, (2,))})


# ------------------------------------------------------------ storage figures


def test_bits_per_param():
    shapes = {"mlp": {"kernel": jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)},
              "norm": {"scale": jax.ShapeDtypeStruct((4096,), jnp.float32)}}
    for kind, dq, lo, hi in (("nf4", True, 4.12, 4.13), ("nf4", False, 4.49, 4.5),
                             ("fp4", True, 4.12, 4.13), ("int4", False, 4.24, 4.26)):
        tree = jax.eval_shape(lambda p, kind=kind, dq=dq: quantize(p, kind, double_quant=dq),
                              shapes)
        r = bits_per_param(tree)
        assert lo <= r["bits_per_param"] <= hi, (kind, dq, r)
        assert r["unquantized_leaves"] == 1 and r["unquantized_params"] == 4096
        assert r["unquantized_bytes"] == 4096 * 4 and r["quantized_params"] == 4096 * 4096
        assert r["by_kind"][kind]["leaves"] == 1
    small = quantize({"k": {"kernel": jnp.ones((64, 64))}}, "nf4", double_quant=False)
    assert bits_per_param(small)["quantized_bytes"] == 64 * 64 // 2 + 64 * 4


# ---------------------------------------------------------- property tests


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 40), n=st.integers(1, 40), kind=st.sampled_from(["nf4", "fp4", "int4"]),
       scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_property_roundtrip(k, n, kind, scale, seed):
    if k * n < 2:
        n = 2
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * scale).astype(np.float32)
    q = quantize_array(jnp.asarray(w), kind, block_size=32, double_quant=False, group_size=16)
    assert q.shape == (k, n)
    d = np.asarray(q.materialize())
    if kind == "int4":
        g = q.group_size
        s = np.repeat(np.asarray(q.scales), g, axis=0)[:k]
        assert np.all(np.abs(w - d) <= s / 2 * (1 + 1e-5) + 1e-30)
    else:
        assert q.codes.shape == ((k * n + 1) // 2,)
        _check_block_bound(w, q)
