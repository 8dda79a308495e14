"""Nodes inside ``shard_map``: the rule splits each node's leaves by specs derived from the
weight's own, and re-runs the body under the interpreter, so LoRA stays factored per shard
and ``infer_layout``/``lorafy(fn=)`` read layouts through it.

Meshes of 1, 3, 4 and 6 CPU devices (conftest forces 8) keep the dims odd: 9 splits in 3.
"""

import math

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from helpers import close, randomize, randomize_zero_factors
from lora_jax.core.shard_map import NoSpec, leaf_specs, shard_map_fn

shard_map = shard_map_fn()


def _mesh(shape, names):
    n = math.prod(shape)
    if len(jax.devices()) < n:
        pytest.skip(f"needs {n} devices, has {len(jax.devices())}")
    return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def _normal(seed, shape, scale=0.3):
    return jax.random.normal(jax.random.key(seed), shape) * scale


# Each case: (fn, params, x, {path: expected (stack_ndim, in_axes)}).

def case_one():           # the repro: a 1-device mesh
    mesh = _mesh((1,), ("d",))
    fn = lambda p, x: shard_map(lambda p, x: jnp.tanh(x @ p["w"]), mesh=mesh,
                                in_specs=(P(), P("d")), out_specs=P("d"))(p, x)
    return fn, {"w": _normal(4, (9, 7))}, _normal(2, (2, 9), 1.0), {"w": (0, (0,))}


def _data_parallel(n, batch):
    mesh = _mesh((n,), ("d",))
    fn = lambda p, x: shard_map(lambda p, x: jnp.tanh(x @ p["w"]), mesh=mesh,
                                in_specs=(P(), P("d")), out_specs=P("d"))(p, x)
    return fn, {"w": _normal(4, (9, 7))}, _normal(2, (batch, 9), 1.0), {"w": (0, (0,))}


def case_dp3():
    return _data_parallel(3, 6)


def case_dp4():
    return _data_parallel(4, 4)


def case_in(check_vma=True):   # weight split along its input axis; the body psums
    mesh = _mesh((3,), ("m",))
    fn = lambda p, x: shard_map(lambda p, x: jax.lax.psum(x @ p["w"], "m"), mesh=mesh,
                                in_specs=(P("m", None), P(None, "m")), out_specs=P(),
                                check_vma=check_vma)(p, x)
    return fn, {"w": _normal(4, (9, 7))}, _normal(2, (2, 9), 1.0), {"w": (0, (0,))}


def case_in_novma():
    return case_in(check_vma=False)


def case_out():           # weight split along its output axis
    mesh = _mesh((3,), ("m",))
    fn = lambda p, x: shard_map(lambda p, x: jnp.tanh(x @ p["w"]), mesh=mesh,
                                in_specs=(P(None, "m"), P()), out_specs=P(None, "m"))(p, x)
    return fn, {"w": _normal(4, (5, 9))}, _normal(2, (2, 5), 1.0), {"w": (0, (0,))}


def case_mlp():           # Megatron MLP on a 2x3 mesh; `down` is torch-style (out, in)
    mesh = _mesh((2, 3), ("d", "m"))

    def body(p, x):
        h = jax.nn.gelu(x @ p["up"])
        return jax.lax.psum(h @ p["down"].T, "m")

    fn = lambda p, x: shard_map(body, mesh=mesh, in_specs=({"up": P(None, "m"),
                                                            "down": P(None, "m")}, P("d")),
                                out_specs=P("d"))(p, x)
    params = {"up": _normal(4, (5, 9)), "down": _normal(5, (7, 9))}
    return fn, params, _normal(2, (4, 5), 1.0), {"up": (0, (0,)), "down": (0, (1,))}


def case_scan():          # stacked layers scanned inside the body, data parallel
    mesh = _mesh((3,), ("d",))

    def body(p, x):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["w"])[0]

    fn = lambda p, x: shard_map(body, mesh=mesh, in_specs=(P(), P("d")), out_specs=P("d"))(p, x)
    return fn, {"w": _normal(4, (3, 7, 7))}, _normal(2, (3, 7), 1.0), {"w": (1, (0,))}


CASES = {f.__name__[5:]: f for f in (case_one, case_dp3, case_dp4, case_in, case_in_novma,
                                       case_out, case_mlp, case_scan)}


@pytest.mark.parametrize("name", CASES)
def test_layout_is_read_through_shard_map(name):
    fn, params, x, want = CASES[name]()
    assert lj.infer_layout(fn, params, x) == want
    lp = lj.lorafy(params, rank=3, fn=fn, args=(x,))
    for path, (stack, ins) in want.items():
        w = lp[path]
        assert isinstance(w, lj.LoraWeight), path
        assert (w.stack_ndim, w.in_axes, w.rank) == (stack, ins, 3), path


@pytest.mark.parametrize("name", CASES)
def test_lora_matches_base_and_merged(name, key):
    fn, params, x, _ = CASES[name]()
    f = lj.lora(fn, strict=True)          # strict: no node is formed densely
    lp = lj.lorafy(params, rank=3, fn=fn, args=(x,), key=key)
    np.testing.assert_array_equal(np.asarray(f(lp, x)), np.asarray(fn(params, x)))   # B = 0

    lp = randomize_zero_factors(lp, jax.random.key(1))
    ref = fn(lj.merge(lp), x)
    eager = f(lp, x)
    close(eager, ref, 1e-5)
    close(jax.jit(f)(lp, x), eager, 1e-6)


@pytest.mark.parametrize("name", CASES)
def test_grad_matches_merged(name, key):
    fn, params, x, _ = CASES[name]()
    lp = randomize(lj.lorafy(params, rank=3, fn=fn, args=(x,), key=key), jax.random.key(1))
    trainable, frozen = lj.split(lp)
    f = lj.lora(fn, strict=True)

    def loss(tr):
        return jnp.sum(jnp.sin(f(lj.combine(tr, frozen), x)))

    def loss_merged(tr):
        return jnp.sum(jnp.sin(fn(lj.merge(lj.combine(tr, frozen)), x)))

    want = jax.grad(loss_merged)(trainable)
    for got in (jax.grad(loss)(trainable), jax.jit(jax.grad(loss))(trainable)):
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            close(g, w, 1e-4)


@pytest.mark.parametrize("split", ["input", "output"])
@pytest.mark.parametrize("check_vma", [True, False])
def test_grad_of_lora_called_inside_the_body(check_vma, split, key):
    """``lora(f)`` called inside a body, under ``grad``, uses the second factor's custom_vjp
    (there is no shard_map eqn of its own to switch it off). With the weight split along its
    input axis B is replicated while t = x @ A varies over the shards: the backward must sum
    B's cotangent over them, as JAX's own pvary -> psum transpose does. Split along its
    output axis, a replicated x meets a varying weight: lora traces f with the body's types,
    so f's own pvary of x is there."""
    mesh = _mesh((3,), ("m",))
    x = _normal(2, (2, 9), 1.0)
    lp = randomize(lj.lorafy({"w": _normal(4, (9, 6))}, rank=3, key=key), jax.random.key(1))
    trainable, frozen = lj.split(lp)
    inner = lj.lora(lambda w, x: x @ w, strict=True)
    w_spec, x_spec, out_spec = ((P("m", None), P(None, "m"), P()) if split == "input"
                                else (P(None, "m"), P(), P(None, "m")))

    def fn(w, x):                      # the node enters as its leaves
        leaves, treedef = jax.tree.flatten(w)

        def body(ls, x):
            y = inner(jax.tree.unflatten(treedef, ls), x)
            return jax.lax.psum(y, "m") if split == "input" else y
        return shard_map(body, mesh=mesh, in_specs=(leaf_specs(w, w_spec), x_spec),
                         out_specs=out_spec, check_vma=check_vma)(leaves, x)

    def loss(tr):
        return jnp.sum(jnp.sin(fn(lj.combine(tr, frozen)["w"], x)))

    def loss_merged(tr):
        return jnp.sum(jnp.sin(x @ lj.merge(lj.combine(tr, frozen))["w"]))

    close(fn(lp["w"], x), x @ lj.merge(lp)["w"], 1e-5)
    want = jax.grad(loss_merged)(trainable)
    for got in (jax.grad(loss)(trainable), jax.jit(jax.grad(loss))(trainable)):
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            close(g, w, 1e-4)


def test_input_axis_shards_are_partial_sums_of_base_plus_delta():
    """Without the psum, shard k returns x_k @ W0_k + s * (x_k @ A_k) @ B: both parts are
    partials over the input axis, so the body's psum of the sum gives the full product."""
    mesh = _mesh((3,), ("m",))
    fn = lambda p, x: shard_map(lambda p, x: (x @ p["w"])[None], mesh=mesh,
                                in_specs=(P("m", None), P(None, "m")), out_specs=P("m"))(p, x)
    x = _normal(2, (2, 9), 1.0)
    lp = randomize(lj.lorafy({"w": _normal(4, (9, 7))}, rank=3, key=jax.random.key(3)),
                   jax.random.key(1))
    w = lp["w"]
    parts = lj.lora(fn, strict=True)(lp, x)            # [3, 2, 7]: one partial per shard
    assert parts.shape == (3, 2, 7)
    for k in range(3):
        rows = slice(3 * k, 3 * k + 3)
        want = x[:, rows] @ w.w0[rows] + w.scale * (x[:, rows] @ w.a[rows]) @ w.b
        close(parts[k], want, 1e-5)
    close(parts.sum(0), x @ lj.merge(lp)["w"], 1e-5)


@pytest.mark.parametrize("name", ["dp3", "in", "mlp"])
def test_quantized_base(name, key):
    """QLoRA: a replicated quantized base enters as its codes and scales; one split along a
    layer axis (whose packed blocks cannot be split) is dequantized first, silently."""
    fn, params, x, want = CASES[name]()
    q = lj.quantize(params, "nf4", fn=fn, args=(x,), block_size=32)
    close(lj.lora(fn, strict=True)(q, x), fn(lj.dequantize(q), x), 1e-6)
    eqn = next(e for e in jax.make_jaxpr(lj.lora(fn))(q, x).jaxpr.eqns
               if e.primitive.name == "shard_map")
    packed = any(v.aval.dtype == jnp.uint8 for v in eqn.invars)
    assert packed == (name == "dp3")     # the codes enter themselves only when not layer-split
    lp = randomize_zero_factors(lj.lorafy(q, rank=3, fn=fn, args=(x,), key=key),
                                jax.random.key(1))
    assert isinstance(lp[next(iter(want))].w0, lj.QuantizedWeight)
    f = lj.lora(fn, strict=True)
    close(f(lp, x), fn(lj.merge(lp), x), 1e-5)
    close(jax.jit(f)(lp, x), fn(lj.merge(lp), x), 1e-5)


def test_dora_output_split_stays_factored(key):
    fn, params, x, _ = case_out()
    dp = randomize(lj.to_dora(lj.lorafy(params, rank=3, fn=fn, args=(x,), key=key)),
                   jax.random.key(1), node_type=lj.DoraWeight)
    f = lj.lora(fn, strict=True)
    close(f(dp, x), fn(lj.merge(dp), x), 1e-5)
    close(jax.jit(f)(dp, x), fn(lj.merge(dp), x), 1e-5)


def test_dora_input_split_is_formed_with_a_reason(key):
    """DoRA's column norm runs over the input axes: split, each shard would see a partial."""
    fn, params, x, _ = case_in()
    dp = randomize(lj.to_dora(lj.lorafy(params, rank=3, fn=fn, args=(x,), key=key)),
                   jax.random.key(1), node_type=lj.DoraWeight)
    with pytest.raises(lj.MaterializationError, match="partial norm"):
        lj.lora(fn, strict=True)(dp, x)
    with pytest.warns(lj.MaterializationWarning, match="partial norm"):
        y = lj.lora(fn)(dp, x)
    close(y, fn(lj.merge(dp), x), 1e-5)


def test_node_returned_from_the_body_is_formed():
    mesh = _mesh((3,), ("d",))
    fn = lambda p: shard_map(lambda w: w, mesh=mesh, in_specs=P(None, "d"),
                             out_specs=P(None, "d"))(p["w"])
    lp = randomize(lj.lorafy({"w": _normal(4, (5, 9))}, rank=3), jax.random.key(1))
    with pytest.raises(lj.MaterializationError, match="returned from a shard_map body"):
        lj.lora(fn, strict=True)(lp)
    with pytest.warns(lj.MaterializationWarning, match="returned from a shard_map body"):
        y = lj.lora(fn)(lp)
    close(y, lj.merge(lp)["w"], 1e-6)


def test_dropout_draws_its_own_mask_per_shard():
    fn, params, _, _ = case_dp3()
    x = jnp.tile(_normal(2, (1, 9), 1.0), (6, 1))      # every row the same
    lp = randomize(lj.lorafy(params, rank=3, key=jax.random.key(3)), jax.random.key(1))
    f = lj.lora(fn, strict=True, dropout=0.5)
    y = f(lp, x, dropout_key=jax.random.key(7))
    close(jax.jit(f)(lp, x, dropout_key=jax.random.key(7)), y, 1e-6)
    close(f(lp, x), fn(lj.merge(lp), x), 1e-5)          # no key: no dropout
    # rows 0 and 2 sit on shards 0 and 1, rows 0 and 1 on shard 0: with one mask per shard
    # shared by every shard, rows 0 and 2 would be equal
    assert not np.allclose(y[0], y[2]) and not np.allclose(y[2], y[4])


def test_leaf_specs():
    w = lj.LoraWeight(_normal(1, (2, 7, 5)), _normal(2, (2, 5, 3)), _normal(3, (2, 3, 7)),
                      in_axes=(1,))                      # stacked, torch (out, in)
    assert leaf_specs(w, P("s", "o", "i")) == [P("s", "o", "i"), P("s", "i", None),
                                               P("s", None, "o")]
    assert leaf_specs(w, P()) == [P(None, None, None)] * 3

    d = lj.to_dora(w)
    assert leaf_specs(d, P("s", "o", None)) == [P("s", "o", None), P("s", None, None),
                                                P("s", None, "o"), P("s", "o")]
    with pytest.raises(NoSpec, match="partial norm"):
        leaf_specs(d, P(None, None, "i"))

    q = lj.quantize({"w": _normal(1, (2, 9, 7))}, "nf4", layout={"w": (1, (0,))},
                    block_size=32)["w"]
    assert leaf_specs(q, P("s")) == [P("s", *(None,) * (v.ndim - 1)) for v in jax.tree.leaves(q)]
    with pytest.raises(NoSpec, match="layer axes"):
        leaf_specs(q, P(None, "i"))
    # a LoraWeight over that base: the base's leaves are split along the stacked axis too;
    # a layer split has no spec for them (the rule dequantizes such a base before shard_map)
    lq = lj.lorafy({"w": q}, rank=3)["w"]
    specs = leaf_specs(lq, P("s"))
    assert specs == [P("s", *(None,) * (v.ndim - 1)) for v in jax.tree.leaves(lq)]
    with pytest.raises(NoSpec, match="layer axes"):
        leaf_specs(lq, P(None, None, "o"))


@pytest.mark.parametrize("kind", ["auto", "explicit"])
def test_sharding_constraint_on_a_weight_constrains_each_factor(kind):
    """FSDP-style code constrains a stacked weight before its matmul
    (``with_sharding_constraint``; ``reshard`` on an explicit mesh): the layout is read
    through it, the node stays factored, each leaf is constrained by the derived spec
    (w0 as the weight, A by the stacked and input entries, B by the output ones), and the
    result and gradients equal the merged model's."""
    from jax.sharding import AxisType, NamedSharding
    if len(jax.devices()) < 6:
        pytest.skip("needs 6 devices")
    axis_type = AxisType.Explicit if kind == "explicit" else AxisType.Auto
    mesh = jax.make_mesh((2, 3), ("data", "model"), axis_types=(axis_type,) * 2,
                         devices=jax.devices()[:6])
    constrain = jax.sharding.reshard if kind == "explicit" else jax.lax.with_sharding_constraint
    spec = P(None, "data", "model")                     # [L, in, out]
    params = {"w": _normal(4, (3, 8, 9)), "o": _normal(5, (9, 8))}

    def fn(p, x):
        w = constrain(p["w"], NamedSharding(mesh, spec))
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w) @ p["o"], None), x, w)[0]
    x = _normal(2, (4, 8), 1.0)
    assert lj.infer_layout(fn, params, x) == {"w": (1, (0,)), "o": (0, (0,))}
    lp = randomize_zero_factors(lj.lorafy(params, rank=2, fn=fn, args=(x,)),
                                jax.random.key(1))
    with jax.set_mesh(mesh):
        f = jax.jit(lj.lora(fn, strict=True))
        jaxpr = jax.make_jaxpr(f)(lp, x)
        close(f(lp, x), jax.jit(fn)(lj.merge(lp), x), 1e-5)
        tr, fr = lj.split(lp)
        g = jax.grad(lambda t: jnp.sum(lj.lora(fn, strict=True)(lj.combine(t, fr), x)))(tr)
        g_ref = jax.grad(lambda t: jnp.sum(fn(lj.merge(lj.combine(t, fr)), x)))(tr)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref), strict=True):
        close(a, b, 1e-5)

    def constraints(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name in ("sharding_constraint", "reshard"):
                sh = e.params.get("sharding", e.params.get("dst_sharding"))
                yield tuple(e.invars[0].aval.shape), tuple(sh.spec)
            for sub in jax.extend.core.jaxprs_in_params(e.params):
                yield from constraints(sub)
    seen = dict(constraints(jaxpr.jaxpr))
    assert seen[(3, 8, 9)] == tuple(spec)
    assert seen[(3, 8, 2)] == (None, "data", None)          # A [L, in, r]
    assert seen[(3, 2, 9)] == (None, None, "model")         # B [L, r, out]
