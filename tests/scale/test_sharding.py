"""Sharding specs for LoRA / quantized trees, the sharded train step, and the memory planner.

8 CPU devices (tests/conftest.py sets XLA_FLAGS before jax is imported).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _mp_worker import build
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from lora_jax.quant import QuantizedWeight, quantize
from lora_jax.scale import (
    cross_entropy_loss,
    fsdp_specs,
    logical_specs,
    lora_specs,
    make_train_step,
    per_device_bytes,
    shard_params,
)

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]
AXES = ("data", "fsdp", "tensor")


def _mesh(shape):
    n = math.prod(shape)
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), AXES)


def _train(lp, loss_fn, tx, batch, shape, steps=5):
    return _train_on(lp, loss_fn, batch, _mesh(shape), steps=steps, tx=tx, min_size=256)


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
    # a: 1536 / 64 = 24 blocks per layer
    params = {"a": {"kernel": jax.random.normal(key, (3, 32, 48), jnp.float32)},
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
    dense = jax.jit(lambda n: n.materialize())(placed["a"]["kernel"])
    np.testing.assert_array_equal(np.asarray(dense),
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
    # lorafy of the boxed tree keeps the boxes around the nodes (apply unboxes them); its
    # logical specs are those of the unboxed lorafied tree, A and B split like the weight's
    boxed = jax.eval_shape(lambda p: lj.lorafy(p, rank=2), variables["params"])
    assert isinstance(boxed["up"]["kernel"], nn.LogicallyPartitioned)
    assert logical_specs(boxed, [("embed", "fsdp"), ("mlp", "tensor")]) == s
    real = lj.lorafy(M().init(jax.random.key(0), jnp.zeros((2, 16), jnp.float32))["params"],
                     rank=2)
    placed = shard_params(nn.meta.unbox(real), _mesh((1, 2, 2)),
                          logical_specs(real, [("embed", "fsdp"), ("mlp", "tensor")]))
    assert placed["up"]["kernel"].b.sharding.spec == P(None, "tensor")


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


# ----------------------------------------------------------------------------- make_mesh


class _Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + jax.nn.gelu(nn.Dense(32, name="mid")(h)), None


class _MLP(nn.Module):
    """Column/row-parallel names, a scanned (stacked) layer, 5 classes."""

    @nn.compact
    def __call__(self, x):
        h = jax.nn.gelu(nn.Dense(32, name="up_proj")(x))
        layers = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=2)
        h, _ = layers(name="layers")(h, None)
        return nn.Dense(5, name="down_proj")(h)


def _make_mesh(shape, kind):
    types = (AxisType.Explicit if kind == "explicit" else AxisType.Auto,) * len(shape)
    mesh = jax.make_mesh(shape, AXES, axis_types=types, devices=jax.devices()[:math.prod(shape)])
    assert tuple(mesh.axis_types) == types
    return mesh


@pytest.fixture(scope="module")
def mlp():
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (8, 12))
    batch = {"x": x, "y": jnp.arange(8) % 5}
    base = model.init(jax.random.key(2), x)["params"]

    def loss(apply):
        def loss_fn(params, batch):
            logits = apply({"params": params}, batch["x"])
            # one_hot, not integer labels: take_along_axis's gradient is a scatter that
            # explicit axes cannot place on JAX 0.12.
            return optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["y"], 5)).mean()
        return loss_fn

    trees = {"lora": lj.lorafy(base, rank=3, key=jax.random.key(3)),
             "nf4": lj.lorafy(quantize(base, "nf4"), rank=3, key=jax.random.key(3))}
    return model, base, trees, batch, loss(lj.lora(model.apply)), loss(model.apply)


def _train_on(tree, loss_fn, batch, mesh, trainable="lora", steps=4, tx=None, min_size=64):
    specs = lora_specs(tree, fsdp_specs(tree, mesh, min_size=min_size), mesh)
    tx = optax.adam(1e-2) if tx is None else tx
    step = make_train_step(loss_fn, tx, mesh, specs, trainable=trainable)
    tr, fr, opt = step.init(tree)
    b = step.shard_batch(batch)
    losses = []
    for _ in range(steps):
        tr, opt, loss = step(tr, fr, opt, b)
        losses.append(float(loss))
    return np.array(losses), tr, fr


@pytest.mark.parametrize("model_type,window", [("mistral", 3), ("qwen2", None),
                                               ("qwen3", None)])
def test_llama_family_sharded_steps_match_one_device(model_type, window):
    """The family's extra leaves (q/k/v biases, per-head q/k norms) and a sliding window
    shard and train like the rest: a dp x fsdp x tp mesh gives the one-device losses."""
    from lora_jax.models import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      model_type=model_type, sliding_window=window)
    model = LlamaForCausalLM(cfg)
    lp = lj.lorafy(model.init_params(jax.random.key(0), 4), rank=4, key=jax.random.key(1))
    ids = jax.random.randint(jax.random.key(2), (8, 9), 0, cfg.vocab_size)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    loss_fn = cross_entropy_loss(lj.lora(model.apply))
    ref, *_ = _train_on(lp, loss_fn, batch, _mesh((1, 1, 1)))
    assert ref[-1] < ref[0]
    losses, *_ = _train_on(lp, loss_fn, batch, _mesh((2, 2, 2)))
    np.testing.assert_allclose(losses, ref, rtol=1e-5)


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_make_mesh_lora_and_nf4_match_one_device(kind, mlp):
    """dp x fsdp x tp from jax.make_mesh: the same losses as one device, auto or explicit."""
    model, base, trees, batch, loss_fn, base_loss_fn = mlp
    one, mesh = _make_mesh((1, 1, 1), kind), _make_mesh((2, 2, 2), kind)
    runs = [(name, tree, loss_fn, "lora") for name, tree in trees.items()]
    runs.append(("full fine-tune", base, base_loss_fn, "all"))
    placed = {}
    for name, tree, fn, trainable in runs:
        ref, *_ = _train_on(tree, fn, batch, one, trainable)
        assert ref[-1] < ref[0], name
        losses, *placed[name] = _train_on(tree, fn, batch, mesh, trainable)
        np.testing.assert_allclose(losses, ref, rtol=1e-5, err_msg=name)
    tr, fr = placed["nf4"]
    a, codes = tr["up_proj"]["kernel"].a, fr["layers"]["mid"]["kernel"].w0.codes
    if kind == "explicit":          # weights sharded on their input axis only
        assert a.sharding.spec == P(("fsdp", "tensor"), None)
        assert codes.sharding.spec == P(None, ("fsdp", "tensor"))   # 1024 = 4 x 4 blocks
    else:                           # Megatron column split on up_proj's output axis
        assert a.sharding.spec == P("fsdp", None)
        assert codes.sharding.spec == P(None, "fsdp")


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_nf4_output_sharded_like_the_unquantized_model(kind, mlp):
    model, base, *_ = mlp
    mesh = _make_mesh((2, 2, 2), kind)
    x = jax.random.normal(jax.random.key(4), (8, 12))
    xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    fwd = jax.jit(lambda p, x: lj.lora(model.apply)({"params": p}, x))
    q = quantize(base, "nf4")
    outs = {}
    for name, tree in (("base", base), ("nf4", q)):
        specs = lora_specs(tree, fsdp_specs(tree, mesh, min_size=64), mesh)
        outs[name] = fwd(shard_params(tree, mesh, specs), xs)
    assert outs["nf4"].sharding.spec == outs["base"].sharding.spec
    assert outs["nf4"].sharding.spec[0] == ("data", "fsdp")          # batch sharding kept
    np.testing.assert_allclose(np.asarray(outs["nf4"]),
                               np.asarray(model.apply({"params": lj.dequantize(q)}, x)),
                               rtol=1e-5, atol=1e-6)


def test_fsdp_specs_explicit_axes_shard_inputs_only():
    mesh = _make_mesh((2, 2, 2), "explicit")
    params = {"up_proj": {"kernel": jnp.zeros((12, 32))},        # Flax (in, out)
              "eqx": {"weight": jnp.zeros((7, 12))},             # Equinox (out, in)
              "odd": {"kernel": jnp.zeros((6, 11))},             # 6: fsdp alone divides
              "layers": {"kernel": jnp.zeros((3, 16, 11)), "bias": jnp.zeros((3, 32))},
              "embed": {"embedding": jnp.zeros((64, 8))}}
    s = fsdp_specs(params, mesh, min_size=64)
    assert s["up_proj"]["kernel"] == P(("fsdp", "tensor"), None)   # not column parallel
    assert s["eqx"]["weight"] == P(None, ("fsdp", "tensor"))
    assert s["odd"]["kernel"] == P("fsdp", None)
    assert s["layers"]["kernel"] == P(None, ("fsdp", "tensor"), None)
    assert s["layers"]["bias"] == P() and s["embed"]["embedding"] == P()


def test_specs_follow_in_axes():
    """An (out, in) weight's A takes its input axis' spec, B its output axis'."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((8, 16)), jnp.float32)  # (out, in)
    lw = lj.LoraWeight(w, jnp.zeros((16, 3)), jnp.zeros((3, 8)), in_axes=(1,))
    spec = lora_specs({"k": lw}, {"k": P("tensor", "fsdp")})["k"]
    assert spec.a == P("fsdp", None) and spec.b == P(None, "tensor")
    mesh = _mesh((2, 2, 2))
    for kind, want in (("nf4", P("tensor")), ("int4", P("fsdp", "tensor"))):
        eqx = quantize({"k": {"weight": w}}, kind, group_size=4)
        flax = quantize({"k": {"kernel": w.T}}, kind, group_size=4)
        assert eqx["k"]["weight"].in_axes == (1,) and flax["k"]["kernel"].in_axes == (0,)
        s_eqx = lora_specs(eqx, {"k": {"weight": P("tensor", "fsdp")}}, mesh)["k"]["weight"]
        s_flax = lora_specs(flax, {"k": {"kernel": P("fsdp", "tensor")}}, mesh)["k"]["kernel"]
        assert s_eqx.codes == s_flax.codes == want, kind      # nf4: 128 = 2 blocks -> tensor


def test_nf4_with_sharded_layers_on_explicit_mesh():
    """A stacked NF4 node whose layer axis is sharded dequantizes per layer, in place."""
    mesh = _make_mesh((2, 2, 2), "explicit")
    w = jax.random.normal(jax.random.key(5), (2, 32, 24))          # 768 = 12 blocks per layer
    q = quantize({"k": {"kernel": w}}, "nf4")
    specs = lora_specs(q, {"k": {"kernel": P("data", "fsdp", "tensor")}}, mesh)
    node = shard_params(q, mesh, specs)["k"]["kernel"]
    assert node.codes.sharding.spec == P("data", ("tensor", "fsdp"))
    dense = jax.jit(lambda n: n.materialize())(node)
    assert dense.sharding.spec == P("data", None, None)             # stacked axis kept
    np.testing.assert_array_equal(np.asarray(dense), np.asarray(q["k"]["kernel"].materialize()))


# ----------------------------------------------------------------------------- planner


def test_memory_planner_counts():
    from lora_jax.models import LlamaConfig, LlamaForCausalLM

    L, D, F, V, H, KV, hd, r = 2, 64, 128, 96, 4, 2, 16, 4
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=KV, head_dim=hd)

    def llama(layers, **dtypes):                        # the planner's model factory
        return LlamaForCausalLM(dataclasses.replace(cfg, num_hidden_layers=layers, **dtypes))

    def plan(mode, **kw):
        return lj.plan_memory(llama, mode, layers=L, seq=8, targets=r"^layers/.*/kernel$", **kw)
    kernels = [(D, H * hd), (D, KV * hd), (D, KV * hd), (H * hd, D), (D, F), (D, F), (F, D)]
    n_kernel = L * sum(i * o for i, o in kernels)
    n_other = 2 * V * D + 2 * L * D + D                 # embed, lm_head, norms
    n_ab = L * sum(r * (i + o) for i, o in kernels)

    full = plan("full", n_devices=1, batch=2, compile=False)
    assert full["trainable_params"] == n_kernel + n_other
    assert full["param_bytes"] == 4 * (n_kernel + n_other)
    assert full["grad_bytes"] == 4 * (n_kernel + n_other)
    assert full["opt_bytes"] == 8 * (n_kernel + n_other) + 4      # AdamW mu, nu + int32 count

    lo = plan("lora", n_devices=1, batch=2, rank=r)
    assert lo["trainable_params"] == n_ab
    assert lo["param_bytes"] == 2 * (n_kernel + n_other) + 4 * n_ab   # bf16 base, f32 A/B
    assert lo["grad_bytes"] == 4 * n_ab
    assert lo["opt_bytes"] == 8 * n_ab + 4
    assert lo["temp_bytes"] > lo["grad_bytes"]

    ql = plan("qlora", n_devices=1, batch=2, rank=r, compile=False)
    # NF4 + double quant: n/2 code bytes, 1 byte per 64-block absmax, f32 per 256 absmax, f32 mean.
    q_bytes = sum(L * (i * o // 2 + math.ceil(i * o / 64) + 4 * math.ceil(i * o / 64 / 256) + 4)
                  for i, o in kernels)
    assert ql["param_bytes"] == q_bytes + 2 * n_other + 4 * n_ab
    assert ql["opt_bytes"] == 8 * n_ab + 4

    lo8 = plan("lora", n_devices=8, batch=8, rank=r, compile=False)
    # fsdp_specs shards the larger of (in, out) of each kernel over 8 devices (ties: in);
    # A [L, in, r] follows W's in axis, B [L, r, out] its out axis.
    ab8 = L * sum(r * (i // 8 + o) if i >= o else r * (i + o // 8) for i, o in kernels)
    assert lo8["grad_bytes"] == 4 * ab8
    assert lo8["opt_bytes"] == 8 * ab8 + 4
    with pytest.raises(TypeError, match="factory"):
        lj.plan_memory(cfg, "lora", layers=L)
    with pytest.raises(ValueError, match="mode"):
        lj.plan_memory(llama, "qat", layers=L)
