"""LoftQ init (PEFT ``init_lora_weights="loftq"``): error reduction vs plain NF4, bit-equal
NF4 base vs bitsandbytes, and the same reconstruction error as PEFT's ``loftq_init``
(PEFT tests/test_gpu_examples.py ``TestLoftQ.test_bloomz_loftq_4bit``: LoftQ's error is
below plain QLoRA's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj


def _err(w, approx):
    return float(jnp.linalg.norm(jnp.asarray(w, jnp.float32) - approx))


def _plain_nf4(w, **kw):
    return lj.dequantize(lj.quantize({"kernel": w}, "nf4", **kw))["kernel"]


def _weight(shape=(67, 45), seed=0):
    # a few strong directions over noise, like a trained weight: LoftQ's SVD has
    # something to find
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    low = jax.random.normal(k1, (shape[0], 6)) @ jax.random.normal(k2, (6, shape[1]))
    return 0.2 * low + jax.random.normal(k3, shape)


@pytest.mark.parametrize("iters", [1, 3])
@pytest.mark.parametrize("alpha", [8.0, 32.0])
def test_loftq_reduces_error_and_matches_its_definition(iters, alpha):
    w = _weight()
    p = lj.loftq_init({"kernel": w}, rank=8, alpha=alpha, iters=iters, double_quant=False)
    node = p["kernel"]
    assert isinstance(node, lj.LoraWeight) and lj.is_quantized(node.w0)
    assert node.rank == 8 and node.scale == alpha / 8
    deq = node.w0.materialize()
    ours = _err(w, deq + node.scale * node.a @ node.b)
    assert ours == pytest.approx(_err(w, lj.merge(p)["kernel"]), rel=1e-5)
    assert ours < 0.9 * _err(w, _plain_nf4(w, double_quant=False))
    # the factors are the scaled top-8 SVD of what the stored base misses
    u, sv, vh = np.linalg.svd(np.asarray(w - deq, np.float64))
    best = (u[:, :8] * sv[:8]) @ vh[:8]
    np.testing.assert_allclose(np.asarray(node.scale * node.a @ node.b), best, atol=2e-4)
    if iters == 1:   # the first quantization is plain NF4 of W
        np.testing.assert_array_equal(np.asarray(deq),
                                      np.asarray(_plain_nf4(w, double_quant=False)))


def test_loftq_more_iterations_do_not_hurt_and_stacked_layers():
    w = jnp.stack([_weight(seed=1), _weight(seed=2)])          # [L=2, in, out]
    errs = []
    for it in (1, 4):
        p = lj.loftq_init({"kernel": w}, rank=4, iters=it, layout={"kernel": (1, (0,))})
        assert p["kernel"].a.shape == (2, 67, 4) and p["kernel"].b.shape == (2, 4, 45)
        errs.append(_err(w, lj.merge(p)["kernel"]))
    plain = _err(w, _plain_nf4(w, layout={"kernel": (1, (0,))}))
    assert errs[1] <= errs[0] * 1.001 < plain
    # each layer is its own problem: layer 1 of the stack equals LoftQ of layer 1 alone
    one = lj.loftq_init({"kernel": w[1]}, rank=4)
    stacked = lj.loftq_init({"kernel": w}, rank=4, layout={"kernel": (1, (0,))})
    np.testing.assert_allclose(np.asarray(lj.merge(stacked)["kernel"][1]),
                               np.asarray(lj.merge(one)["kernel"]), atol=1e-5)


def test_loftq_out_in_layout_and_lorafied_input_and_bf16():
    w = _weight((31, 53), seed=3)
    # an (out, in) weight: same matrix transposed, same error
    flax = lj.loftq_init({"kernel": w}, rank=5)
    torch_like = lj.loftq_init({"kernel": w.T}, rank=5, layout={"kernel": (0, (1,))})
    assert _err(w.T, lj.merge(torch_like)["kernel"]) == pytest.approx(
        _err(w, lj.merge(flax)["kernel"]), rel=1e-4)
    # an already lorafied tree keeps its rank/alpha
    lp = lj.lorafy({"kernel": w}, rank=3, alpha=6.0)
    out = lj.loftq_init(lp)
    assert out["kernel"].rank == 3 and out["kernel"].alpha == 6.0
    # bf16 weights: bf16 factors, base dtype bf16
    b16 = lj.loftq_init({"kernel": w.astype(jnp.bfloat16)}, rank=4)
    assert b16["kernel"].a.dtype == jnp.bfloat16 and b16["kernel"].w0.dtype == jnp.bfloat16


def test_loftq_bad_inputs():
    w = _weight((33, 35))
    with pytest.raises(ValueError, match="^loftq_init: rank is required"):
        lj.loftq_init({"kernel": w})
    with pytest.raises(ValueError, match="^loftq_init: bits=8 is not supported"):
        lj.loftq_init({"kernel": w}, rank=2, bits=8)
    with pytest.raises(ValueError, match="^loftq_init: params are already lorafied"):
        lj.loftq_init(lj.lorafy({"kernel": w}, rank=2), rank=2)
    with pytest.raises(TypeError, match="^loftq_init: leaf 'kernel': the base weight is already"):
        lj.loftq_init(lj.quantize(lj.lorafy({"kernel": w}, rank=2)))
    with pytest.raises(ValueError, match="iters"):
        lj.loftq_init({"kernel": w}, rank=2, iters=0)
    with pytest.raises(ValueError, match="leaf 'kernel' holds 1 non-finite value"):
        lj.loftq_init({"kernel": w.at[0, 0].set(jnp.nan)}, rank=2)


# ----------------------------------------------------------------------------- PEFT oracle

def _cpu_only(orig):
    """PEFT's loftq_init moves tensors to "cuda"/"xpu" by name; run it on the CPU."""
    def to(self, *args, **kwargs):
        args = tuple("cpu" if isinstance(a, str) and a in ("cuda", "xpu") else a for a in args)
        if kwargs.get("device") in ("cuda", "xpu"):
            kwargs["device"] = "cpu"
        return orig(self, *args, **kwargs)
    return to


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_matches_peft(monkeypatch, iters):
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    loftq_utils = pytest.importorskip("peft.utils.loftq_utils")
    monkeypatch.setattr(torch.Tensor, "to", _cpu_only(torch.Tensor.to))
    monkeypatch.setattr(bnb.nn.Params4bit, "to", _cpu_only(bnb.nn.Params4bit.to))
    w = np.asarray(_weight((67, 45), seed=4))                  # ours (in, out)
    wt = torch.tensor(w.T.copy())                              # PEFT (out, in)
    deq_t, lora_a, lora_b = loftq_utils.loftq_init(wt, num_bits=4, reduced_rank=8,
                                                   num_iter=iters)
    # PEFT stores L @ R unscaled: alpha = r makes its adapter exactly that
    peft_err = float(torch.linalg.norm(wt - deq_t - lora_b @ lora_a))
    plain_err = float(torch.linalg.norm(wt - deq_t)) if iters == 1 else None
    p = lj.loftq_init({"kernel": jnp.asarray(w)}, rank=8, alpha=8.0, iters=iters,
                      double_quant=False)
    ours = _err(w, lj.merge(p)["kernel"])
    assert ours == pytest.approx(peft_err, rel=0.05)
    if iters == 1:   # the same NF4 base (bitsandbytes' bytes), the same SVD of its error
        np.testing.assert_array_equal(np.asarray(p["kernel"].w0.materialize()), deq_t.numpy().T)
        assert ours == pytest.approx(peft_err, rel=1e-4) and ours < 0.9 * plain_err
        np.testing.assert_allclose(np.asarray(p["kernel"].a @ p["kernel"].b),
                                   (lora_b @ lora_a).numpy().T, atol=1e-4)
    print(f"loftq iters={iters}: ours {ours:.5f} peft {peft_err:.5f}")
