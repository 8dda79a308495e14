"""Mixed-adapter batches beyond matmuls: embedding lookups and convolutions with one adapter
per batch row, and stacks that hold DoRA adapters; each row equals running it alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from helpers import close
from lora_jax.variants import (
    DoraWeight,
    MultiDoraWeight,
    set_adapter,
    stack_adapters,
    to_dora,
    unstack_adapter,
    with_adapter_ids,
)

ROWS = ["dora", None, "lora", "wide", "lora"]   # 5 rows, a base row, a repeated adapter


def _random(p, key):
    """Random A and B (and a magnitude off the norm) on every adapter node."""
    flat, treedef = jax.tree.flatten(
        p, is_leaf=lambda x: isinstance(x, (lj.LoraWeight, DoraWeight)))
    out = []
    for k, x in zip(jax.random.split(key, len(flat)), flat):
        if isinstance(x, (lj.LoraWeight, DoraWeight)):
            ka, kb, km = jax.random.split(k, 3)
            x = dataclasses.replace(x, a=jax.random.normal(ka, x.a.shape) * 0.5,
                                    b=jax.random.normal(kb, x.b.shape) * 0.5)
            if isinstance(x, DoraWeight):
                x = dataclasses.replace(x, m=x.m * (1 + 0.3 * jax.random.normal(km, x.m.shape)))
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def _adapters(base, target, **kw):
    """A LoRA (rank 3), a DoRA (rank 2) and an rsLoRA one (rank 3, other alpha)."""
    def make(i, rank, **more):
        return _random(lj.lorafy(base, rank=rank, targets=target, key=jax.random.key(i),
                                 **kw, **more), jax.random.key(10 + i))
    return {"lora": make(1, 3), "dora": _random(to_dora(make(2, 2)), jax.random.key(7)),
            "wide": make(3, 3, alpha=2.0, rslora=True)}


def _each_row_alone(f, base, ad, x, got):
    for i, name in enumerate(ROWS):
        want = f(base, x[i:i + 1]) if name is None else lj.lora(f)(ad[name], x[i:i + 1])
        close(got[i:i + 1], want, 1e-5)


def _look(p, t):
    return jnp.take(p["embedding"], t, axis=0)


# PEFT tests/test_custom_models.py::TestMixedAdapterBatches
# ::test_mixed_adapter_batches_lora_conv1d_emb (its embedding half)
def test_embedding_lookup_with_one_adapter_per_row():
    base = {"embedding": jax.random.normal(jax.random.key(0), (11, 7))}
    ad = _adapters(base, "embedding")
    mp = stack_adapters(ad, pad_ranks=True)
    assert isinstance(mp["embedding"], MultiDoraWeight)
    tok = jnp.asarray(np.random.RandomState(0).randint(0, 11, (5, 3)))
    got = jax.jit(lj.lora(_look, strict=True))(with_adapter_ids(mp, ROWS), tok)
    _each_row_alone(_look, base, ad, tok, got)
    # one token per row ([B] ids as jnp.take(table, ids[:, None]) gives): same contract
    got1 = jax.jit(lj.lora(_look, strict=True))(with_adapter_ids(mp, ROWS), tok[:, :1])
    close(got1, got[:, :1], 1e-6)
    with pytest.raises(ValueError, match="one id per row"):
        lj.lora(_look)(with_adapter_ids(mp, ROWS[:3]), tok)


def _conv(p, x):
    return jax.lax.conv_general_dilated(x, p["kernel"], (2, 1), "SAME", rhs_dilation=(1, 2),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_nchw(p, x):
    return jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), [(1, 1), (0, 1)],
                                        dimension_numbers=("NCHW", "HWIO", "NCHW"))


def _grouped(p, x):
    return jax.lax.conv_general_dilated(x, p["kernel"], (1, 2), "SAME", feature_group_count=3,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _depthwise_nchw(p, x):
    return jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), [(1, 1), (0, 1)],
                                        feature_group_count=5,
                                        dimension_numbers=("NCHW", "HWIO", "NCHW"))


# PEFT tests/test_custom_models.py::TestMixedAdapterBatches::test_mixed_adapter_batches_lora_conv2d
@pytest.mark.parametrize("f, kernel, shape", [
    (_conv, (3, 2, 5, 7), (5, 7, 6, 5)), (_conv_nchw, (3, 2, 5, 7), (5, 5, 7, 6)),
    (_grouped, (3, 3, 3, 6), (5, 7, 5, 9)), (_depthwise_nchw, (3, 2, 1, 10), (5, 5, 7, 6))],
    ids=["nhwc-strided-dilated", "nchw-padded", "grouped", "depthwise-nchw"])
def test_convolution_with_one_adapter_per_row(f, kernel, shape):
    base = {"kernel": jax.random.normal(jax.random.key(0), kernel)}
    x = jax.random.normal(jax.random.key(1), shape)
    ad = _adapters(base, "kernel", fn=f, args=(x,))
    assert ad["lora"]["kernel"].in_axes == (0, 1, 2)
    mp = stack_adapters(ad, pad_ranks=True)
    got = jax.jit(lj.lora(f, strict=True))(with_adapter_ids(mp, ROWS), x)   # never formed
    _each_row_alone(f, base, ad, x, got)


# PEFT tests/test_custom_models.py::TestMixedAdapterBatches::test_mixed_adapter_batches_lora_mlp
# (PEFT refuses DoRA there: test_mixed_adapter_batches_lora_with_dora_raises; ours computes it)
def test_dora_in_a_stack_exact_rows_training_and_editing():
    base = {"k": jax.random.normal(jax.random.key(0), (5, 7))}
    ad = _adapters(base, "k")
    mp = stack_adapters(ad, pad_ranks=True)

    def mm(p, x):
        return jnp.einsum("bti,io->bto", x, p["k"])
    x = jax.random.normal(jax.random.key(1), (5, 3, 5))
    got = jax.jit(lj.lora(mm, strict=True))(with_adapter_ids(mp, ROWS), x)
    _each_row_alone(mm, base, ad, x, got)
    # unstacking gives the DoRA adapter back (rank 2 of the padded 3, same m)
    back = unstack_adapter(mp, "dora")["k"]
    assert isinstance(back, DoraWeight) and back.rank == 2
    close(back.materialize(), ad["dora"]["k"].materialize(), 1e-6)
    # only the rows' adapters get gradients; m of the unused LoRA slots gets none
    routed = with_adapter_ids(mp, ["lora", "dora", None, "lora", "dora"])
    tr, fr = lj.split(routed)                  # m trains with a and b
    g = jax.grad(lambda t: jnp.sum(lj.lora(mm)(lj.combine(t, fr), x) ** 2))(tr)["k"]
    order = mp["k"].names
    gm = np.abs(np.asarray(g.m)).sum(axis=1)
    assert gm[order.index("dora")] > 0 and gm[order.index("lora")] == 0 \
        and gm[order.index("wide")] == 0
    assert float(jnp.abs(g.a[order.index("wide")]).max()) == 0.0
    # a stack whose DoRA adapter no row uses equals the LoRA-only stack
    plain = stack_adapters({k: v for k, v in ad.items() if k != "dora"}, pad_ranks=True)
    rows = ["lora", None, "wide", "lora", None]
    close(lj.lora(mm)(with_adapter_ids(mp, rows), x),
          lj.lora(mm)(with_adapter_ids(plain, rows), x), 1e-6)
    # replacing the DoRA adapter keeps shapes (no recompile) and takes effect
    new = _random(to_dora(lj.lorafy(base, rank=2, targets="k", key=jax.random.key(9))),
                  jax.random.key(19))
    mp2 = set_adapter(with_adapter_ids(mp, ROWS), "dora", new)
    assert jax.tree.map(jnp.shape, mp2) == jax.tree.map(jnp.shape, with_adapter_ids(mp, ROWS))
    close(lj.lora(mm)(mp2, x)[:1], lj.lora(mm)(new, x[:1]), 1e-5)
