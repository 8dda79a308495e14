"""Sharding specs for LoRA / quantized trees, the sharded train step, and the memory planner."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import lora_jax as lj
from lora_jax.quant.quantize import QuantizedWeight, quantize
from lora_jax.scale.sharding import (fsdp_specs, logical_specs, lora_specs, per_device_bytes, shard_params)
from lora_jax.scale.step import make_train_step

from _mp_worker import build

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
AXES = ("data", "fsdp", "tensor")


def _mesh(shape):
    n = math.prod(shape)
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), AXES)


def _train(lp, loss_fn, tx, batch, shape, steps=5):
    mesh = _mesh(shape)
    specs = lora_specs(lp, fsdp_specs(lp, mesh, min_size=256), mesh)
    step = make_train_step(loss_fn, tx, mesh, specs)
    tr, fr, opt = step.init(lp)
    b = step.shard_batch(batch)
    losses = []
    for _ in range(steps):
        tr, opt, loss = step(tr, fr, opt, b)
        losses.append(float(loss))
    return np.array(losses), tr, fr


@pytest.fixture(scope="module")
def model_setup():
    return build()


@pytest.fixture(scope="module")
def trees(model_setup):
    _, lp, *_ = model_setup
    base = lj.merge(lp)  # B = 0: the base itself
    return {"lora": lp, "qlora": lj.lorafy(quantize(base, "nf4"), rank=4, key=jax.random.key(1))}


@pytest.fixture(scope="module")
def reference(model_setup, trees):
    _, _, batch, loss_fn, tx = model_setup
    return {k: _train(t, loss_fn, tx, batch, (1, 1, 1))[0] for k, t in trees.items()}


# ----------------------------------------------------------------------------- spec rules


def test_lora_specs_factor_rules():
    w = jnp.zeros((3, 16, 24), jnp.float32)          # stacked [L, in, out]
    params = {"layers": {"k": {"kernel": w}, "scale": jnp.ones((3, 16), jnp.float32)}}
    lp = lj.lorafy(params, rank=2, targets="kernel")
    base = {"layers": {"k": {"kernel": P("x", "fsdp", "tensor")}, "scale": None}}
    specs = lora_specs(lp, base)
    k = specs["layers"]["k"]["kernel"]
    assert isinstance(k, lj.LoraWeight)
    assert k.w0 == P("x", "fsdp", "tensor")
    assert k.a == P("x", "fsdp", None)               # input axes, rank replicated
    assert k.b == P("x", None, "tensor")             # output axes
    assert specs["layers"]["scale"] == P()
    # Split halves keep working (None holes).
    tr, fr = lj.split(lp)
    assert lora_specs(tr, base)["layers"]["k"]["kernel"].a == P("x", "fsdp", None)
    assert lora_specs(fr, base)["layers"]["k"]["kernel"].w0 == P("x", "fsdp", "tensor")


def test_quantized_specs_keep_blocks_whole():
    mesh = _mesh((2, 2, 2))
    key = jax.random.key(0)
    params = {"a": {"kernel": jax.random.normal(key, (3, 32, 48), jnp.float32)},   # 1536/64 = 24 blocks
              "b": {"kernel": jax.random.normal(key, (3, 32, 67), jnp.float32)}}   # partial block
    q = quantize(params, "nf4")
    base = {"a": {"kernel": P(None, "fsdp", "tensor")}, "b": {"kernel": P(None, "fsdp", None)}}
    s = lora_specs(q, base, mesh)
    qa, qb = s["a"]["kernel"], s["b"]["kernel"]
    assert isinstance(qa, QuantizedWeight)
    # Output axes lead the flat (out, in) run: tensor first, then fsdp; 24 blocks / 4 whole.
    assert qa.codes == P(None, ("tensor", "fsdp")) and qa.scales == P(None, ("tensor", "fsdp"))
    assert qa.nested_scales == P(None, None) and qa.offset == P(None)
    # 32*67 is not a multiple of 64: a partial block -> the flat axis is replicated.
    assert qb.codes == P(None, None) and qb.scales == P(None, None)
    placed = shard_params(q, mesh, s)
    c = placed["a"]["kernel"].codes
    assert c.sharding.spec == P(None, ("tensor", "fsdp"))
    assert c.addressable_shards[0].data.nbytes == c.nbytes // 4
    # Every shard holds whole blocks: shard length is a multiple of block_size / 2 bytes.
    assert (c.shape[-1] // 4) % (64 // 2) == 0
    # Dequantizing the sharded node gives the same weights.
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda n: n.materialize())(placed["a"]["kernel"])),
                                  np.asarray(q["a"]["kernel"].materialize()))

    qi = quantize(params, "int4", group_size=8)     # codes [3, 16, 48], scales [3, 4, 48]
    si = lora_specs(qi, base, mesh)["a"]["kernel"]
    assert si.codes == P(None, "fsdp", "tensor") and si.scales == P(None, "fsdp", "tensor")
    qi3 = quantize(params, "int4", group_size=32)   # one group along in: not splittable
    si3 = lora_specs(qi3, base, mesh)["a"]["kernel"]
    assert si3.codes == P(None, None, "tensor")


def test_logical_specs_from_flax_annotations():
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.normal(0.1), ("embed", "mlp"))
            return nn.Dense(24, kernel_init=init, name="up")(x)

    variables = jax.eval_shape(M().init, jax.random.key(0), jnp.zeros((2, 16), jnp.float32))
    base = logical_specs(variables["params"], [("embed", "fsdp"), ("mlp", "tensor")])
    assert base["up"]["kernel"] == P("fsdp", "tensor")
    params = nn.meta.unbox(variables["params"])
    lp = jax.eval_shape(lambda p: lj.lorafy(p, rank=2), params)
    s = lora_specs(lp, base)
    assert s["up"]["kernel"].a == P("fsdp", None) and s["up"]["kernel"].b == P(None, "tensor")


def test_fsdp_specs_heuristic(model_setup):
    _, lp, *_ = model_setup
    mesh = _mesh((2, 2, 2))
    s = fsdp_specs(lj.merge(lp), mesh, min_size=256)
    attn, mlp = s["layers"]["self_attn"], s["layers"]["mlp"]
    assert attn["q_proj"]["kernel"] == P(None, "fsdp", "tensor")   # column parallel
    assert attn["o_proj"]["kernel"] == P(None, "tensor", "fsdp")   # row parallel
    assert mlp["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert s["embed_tokens"]["embedding"] == P(None, "fsdp")       # 67 does not divide
    assert s["layers"]["input_layernorm"]["scale"] == P()          # small: replicated


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("mode", ["lora", "qlora"])
def test_sharded_steps_match_single_device(mode, model_setup, trees, reference):
    _, _, batch, loss_fn, tx = model_setup
    ref = reference[mode]
    assert ref[-1] < ref[0]
    for shape in MESHES:
        losses, tr, fr = _train(trees[mode], loss_fn, tx, batch, shape)
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=f"mesh {shape}")
        if shape != (2, 2, 2):
            continue
        q_tr = tr["layers"]["self_attn"]["q_proj"]["kernel"]
        q_fr = fr["layers"]["self_attn"]["q_proj"]["kernel"]
        assert q_tr.a.sharding.spec == P(None, "fsdp", None)
        assert q_tr.b.sharding.spec == P(None, None, "tensor")
        o_tr = tr["layers"]["self_attn"]["o_proj"]["kernel"]
        assert o_tr.a.sharding.spec == P(None, "tensor", None)
        assert o_tr.b.sharding.spec == P(None, None, "fsdp")
        w0 = q_fr.w0
        if mode == "lora":
            assert w0.sharding.spec == P(None, "fsdp", "tensor")
            assert w0.addressable_shards[0].data.nbytes == w0.nbytes // 4   # fsdp x tensor
        else:
            assert isinstance(w0, QuantizedWeight)
            assert w0.codes.sharding.spec == P(None, ("tensor", "fsdp"))
            assert w0.scales.sharding.spec == P(None, ("tensor", "fsdp"))
            assert w0.codes.addressable_shards[0].data.nbytes == w0.codes.nbytes // 4
            assert w0.scales.addressable_shards[0].data.nbytes == w0.scales.nbytes // 4
        # Replicated over "data": every device of the 8 holds total/4 of the base.
        frozen_total = sum(x.nbytes for x in jax.tree.leaves(q_fr))
        assert per_device_bytes(q_fr) == frozen_total // 4 + (
            0 if mode == "lora" else w0.nested_scales.nbytes * 3 // 4 + w0.offset.nbytes * 3 // 4)


def test_full_finetune_step_shards_and_donates(model_setup):
    model, lp, batch, _, tx = model_setup
    from lora_jax.scale.step import cross_entropy_loss
    base = lj.merge(lp)
    loss_fn = cross_entropy_loss(model.apply)
    mesh = _mesh((2, 4, 1))
    step = make_train_step(loss_fn, tx, mesh, fsdp_specs(base, mesh, min_size=256), trainable="all")
    tr, fr, opt = step.init(base)
    old = tr["lm_head"]["kernel"]
    tr, opt, loss = step(tr, fr, opt, step.shard_batch(batch))
    assert old.is_deleted()                                        # donated
    assert tr["lm_head"]["kernel"].sharding.spec == P("fsdp", None)
    mu = opt[0].mu["lm_head"]["kernel"]
    assert mu.sharding.spec == P("fsdp", None)                     # moments sharded like params
    assert np.isfinite(float(loss))


# ----------------------------------------------------------------------------- planner


def test_memory_planner_counts():
    from lora_jax.scale.plan import plan_memory
    from lora_jax.models.llama import LlamaConfig

    L, D, F, V, H, KV, hd, r = 2, 64, 128, 96, 4, 2, 16, 4
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KV, head_dim=hd)
    kernels = [(D, H * hd), (D, KV * hd), (D, KV * hd), (H * hd, D), (D, F), (D, F), (F, D)]
    n_kernel = L * sum(i * o for i, o in kernels)
    n_other = 2 * V * D + 2 * L * D + D                 # embed, lm_head, norms
    n_ab = L * sum(r * (i + o) for i, o in kernels)

    full = plan_memory(cfg, "full", n_devices=1, batch=2, seq=8, compile=False)
    assert full["trainable_params"] == n_kernel + n_other
    assert full["param_bytes"] == 4 * (n_kernel + n_other)
    assert full["grad_bytes"] == 4 * (n_kernel + n_other)
    assert full["opt_bytes"] == 8 * (n_kernel + n_other) + 4      # AdamW mu, nu + int32 count

    lo = plan_memory(cfg, "lora", n_devices=1, batch=2, seq=8, rank=r)
    assert lo["trainable_params"] == n_ab
    assert lo["param_bytes"] == 2 * (n_kernel + n_other) + 4 * n_ab   # bf16 base, f32 A/B
    assert lo["grad_bytes"] == 4 * n_ab
    assert lo["opt_bytes"] == 8 * n_ab + 4
    assert lo["temp_bytes"] > lo["grad_bytes"]

    ql = plan_memory(cfg, "qlora", n_devices=1, batch=2, seq=8, rank=r, compile=False)
    # NF4 + double quant: n/2 code bytes, 1 byte per 64-block absmax, f32 per 256 absmax, f32 mean.
    q_bytes = sum(L * (i * o // 2 + math.ceil(i * o / 64) + 4 * math.ceil(i * o / 64 / 256) + 4)
                  for i, o in kernels)
    assert ql["param_bytes"] == q_bytes + 2 * n_other + 4 * n_ab
    assert ql["opt_bytes"] == 8 * n_ab + 4

    lo8 = plan_memory(cfg, "lora", n_devices=8, batch=8, seq=8, rank=r, compile=False)
    # fsdp_specs shards the larger of (in, out) of each kernel over 8 devices (ties: in);
    # A [L, in, r] follows W's in axis, B [L, r, out] its out axis.
    ab8 = L * sum(r * (i // 8 + o) if i >= o else r * (i + o // 8) for i, o in kernels)
    assert lo8["grad_bytes"] == 4 * ab8
    assert lo8["opt_bytes"] == 8 * ab8 + 4
