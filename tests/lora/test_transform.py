"""lora(fn) equals fn on the merged weights, for every construct the transform handles."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import lora_jax as lj
from helpers import Stack, check_lora_matches_merged, close, randomize_b

DTYPES = [(jnp.float32, 2e-5, 2e-4), (jnp.bfloat16, 3e-2, 6e-2)]


def _linen(module, x, key):
    params = module.init(key, x)["params"]
    return (lambda p, x: module.apply({"params": p}, x)), params


@pytest.mark.parametrize("dtype,tol,gtol", DTYPES)
def test_dense(key, dtype, tol, gtol):
    m = nn.Sequential([nn.Dense(7, dtype=dtype), nn.relu, nn.Dense(11, dtype=dtype)])
    x = jax.random.normal(key, (3, 5)).astype(dtype)
    fn, p = _linen(m, x, key)
    check_lora_matches_merged(fn, p, (x,), key=key, tol=tol, grad_tol=gtol)


def test_dense_batched_input_and_bf16_params(key):
    m = nn.Dense(7, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jax.random.normal(key, (2, 3, 5)).astype(jnp.bfloat16)
    fn, p = _linen(m, x, key)
    lp = check_lora_matches_merged(fn, p, (x,), key=key, tol=3e-2, grad_tol=6e-2)
    assert lp["kernel"].a.dtype == jnp.bfloat16


def test_dense_general_multi_axis(key):
    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((3, 7), name="qkv")(x)               # (5, 3, 7)
            return nn.DenseGeneral(5, axis=(-2, -1), name="proj")(h)  # (3, 7, 5)

    x = jax.random.normal(key, (2, 4, 5))
    fn, p = _linen(M(), x, key)
    layout = {"qkv": (0, 1), "proj": (0, 2)}
    assert lj.infer_layout(fn, p, x) == {"qkv/kernel": (0, (0,)), "proj/kernel": (0, (0, 1))}
    lp = check_lora_matches_merged(fn, p, (x,), key=key, layout=layout)
    assert lp["qkv"]["kernel"].a.shape == (5, 2) and lp["qkv"]["kernel"].b.shape == (2, 3, 7)
    assert lp["proj"]["kernel"].a.shape == (3, 7, 2) and lp["proj"]["kernel"].b.shape == (2, 5)


def test_multi_head_attention_default_layout(key):
    m = nn.MultiHeadDotProductAttention(num_heads=3, qkv_features=9, out_features=5)
    x = jax.random.normal(key, (2, 4, 5))
    params = m.init(key, x)["params"]
    fn = lambda p, x: m.apply({"params": p}, x)
    lp = check_lora_matches_merged(fn, params, (x,), key=key)
    assert lp["query"]["kernel"].in_ndim == 1 and lp["out"]["kernel"].in_ndim == 2
    lj.lora(fn, strict=True)(lp, x)   # nothing formed densely


def test_einsum(key):
    m = nn.Einsum((5, 7), "bi,io->bo")
    x = jax.random.normal(key, (3, 5))
    fn, p = _linen(m, x, key)
    check_lora_matches_merged(fn, p, (x,), key=key, targets="kernel")


def test_conv(key):
    m = nn.Conv(7, kernel_size=(3, 3), padding="SAME")
    x = jax.random.normal(key, (2, 9, 9, 5))
    fn, p = _linen(m, x, key)
    layout = lj.infer_layout(fn, p, x)
    assert layout == {"kernel": (0, (0, 1, 2))}
    lp = check_lora_matches_merged(fn, p, (x,), key=key, rank=3, tol=5e-5, layout=layout)
    assert lp["kernel"].a.shape == (3, 3, 5, 3) and lp["kernel"].b.shape == (3, 7)
    lj.lora(fn, strict=True)(lp, x)


def test_conv_strided_1d(key):
    m = nn.Sequential([nn.Conv(7, kernel_size=(3,), strides=(2,), padding="VALID")])
    x = jax.random.normal(key, (2, 11, 5))
    fn, p = _linen(m, x, key)
    assert lj.default_layout("layers_0/kernel", (3, 5, 7)) == (1, (0,))   # a shape can't tell
    assert lj.default_layout("Conv_0/kernel", (3, 5, 7)) == (0, (0, 1))     # the name can
    check_lora_matches_merged(fn, p, (x,), key=key, tol=5e-5, layout=lj.infer_layout(fn, p, x))


def test_keras_names_are_guessed():
    """Keras' MultiHeadAttention output [H, Dh, D] and its RNN's recurrent kernel."""
    assert lj.default_layout("mha/attention_output/kernel", (3, 5, 7)) == (0, (0, 1))
    assert lj.default_layout("layers/attention_output/kernel", (2, 3, 5, 7)) == (1, (0, 1))
    lp = lj.lorafy({"lstm": {"kernel": jnp.ones((5, 28)), "recurrent_kernel": jnp.ones((7, 28)),
                             "bias": jnp.ones(28)}}, rank=2)
    assert lp["lstm"]["recurrent_kernel"].in_axes == (0,) and lp["lstm"]["kernel"].a.shape == (5, 2)


class TiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 5, name="embed")
        h = nn.Dense(5, name="mix")(emb(ids))
        return emb.attend(h)


def test_embed_lookup_and_attend(key):
    ids = jnp.array([[0, 3, 10], [7, 7, 1]])
    m = TiedLM()
    fn, p = _linen(m, ids, key)
    lp = check_lora_matches_merged(fn, p, (ids,), key=key, targets=["embedding", "kernel"])
    lj.lora(fn, strict=True)(lp, ids)   # gather and transposed dot have rules


def test_scan_remat_stack(key):
    x = jax.random.normal(key, (2, 4, 5))
    fn, p = _linen(Stack(), x, key)
    assert p["layers"]["up"]["kernel"].shape == (3, 5, 9)
    assert lj.infer_layout(fn, p, x) == {"layers/up/kernel": (1, (0,)),
                                         "layers/down/kernel": (1, (0,))}
    lp = check_lora_matches_merged(fn, p, (x,), key=key, targets="kernel")
    w = lp["layers"]["up"]["kernel"]
    assert w.a.shape == (3, 5, 2) and w.b.shape == (3, 2, 9) and w.stack_ndim == 1
    # independent A per layer
    assert not np.allclose(w.a[0], w.a[1])
    lj.lora(fn, strict=True)(lp, x)


def test_remat_kept_in_jaxpr(key):
    x = jax.random.normal(key, (2, 4, 5))
    fn, p = _linen(Stack(), x, key)
    lp = lj.lorafy(p, rank=2, targets="kernel")
    tr, fr = lj.split(lp)
    loss = lambda tr: lj.lora(fn)(lj.combine(tr, fr), x).sum()
    text = str(jax.make_jaxpr(jax.grad(loss))(tr))
    assert "remat" in text or "checkpoint" in text


class ControlFlow(nn.Module):
    dynamic_while: bool = False

    @nn.compact
    def __call__(self, x):
        w1 = self.param("w1", nn.initializers.lecun_normal(), (5, 7))
        w2 = self.param("w2", nn.initializers.lecun_normal(), (7, 7))
        w3 = self.param("w3", nn.initializers.lecun_normal(), (7, 7))
        h = x @ w1
        h = lax.cond(jnp.sum(h) > 0, lambda h: jnp.tanh(h @ w2), lambda h: jnp.sin(h) @ w2, h)
        h = lax.switch(1, [lambda h: h, lambda h: h @ w3, lambda h: -h], h)
        h = lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ w3), h)
        if self.dynamic_while:   # a data-dependent trip count: forward-mode differentiable only
            n = jnp.sum(jnp.abs(x) > 0.5)
            _, h = lax.while_loop(lambda c: c[0] < n, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w2)),
                                  (jnp.int32(0), h))
        return h


@pytest.mark.parametrize("dynamic_while", [False, True])
def test_cond_switch_fori_while(key, dynamic_while):
    x = jax.random.normal(key, (3, 5))
    fn, p = _linen(ControlFlow(dynamic_while), x, key)
    text = str(jax.make_jaxpr(fn)(p, x))
    assert "cond[" in text and ("while[" in text) == dynamic_while
    lp = check_lora_matches_merged(fn, p, (x,), key=key, targets=["w1", "w2", "w3"],
                                   mode="fwd" if dynamic_while else "rev")
    lj.lora(fn, strict=True)(lp, x)


@jax.custom_vjp
def _matmul(x, w):
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, g):
    x, w = res
    return g @ w.T, x.T @ g


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def test_custom_vjp_consuming_weight(key):
    fn = lambda p, x: jnp.tanh(_matmul(x, p["w"]))
    p = {"w": jax.random.normal(key, (5, 7))}
    x = jax.random.normal(key, (3, 5))
    with pytest.warns(lj.MaterializationWarning, match="custom_vjp"):
        check_lora_matches_merged(fn, p, (x,), key=key, targets="w")
    lp = lj.lorafy(p, rank=2, targets="w")
    with pytest.raises(lj.MaterializationError, match="custom_vjp"):
        lj.lora(fn, strict=True)(lp, x)


def test_custom_jvp_on_activations_is_untouched(key):
    fn = lambda p, x: jax.nn.softplus(x @ p["w"]) + jax.nn.relu(x @ p["w"])
    p = {"w": jax.random.normal(key, (5, 7))}
    x = jax.random.normal(key, (3, 5))
    lp = check_lora_matches_merged(fn, p, (x,), key=key, targets="w")
    lj.lora(fn, strict=True)(lp, x)


def test_plain_jnp_with_transposes_and_einsum(key):
    def fn(p, x):
        h = jnp.einsum("bi,io->bo", x, p["w"])
        h = jnp.dot(p["v"].T, h.T).T          # weight used as lhs, transposed
        u = p["u"].reshape(3, 3, 7).reshape(9, 7)  # reshapes of the weight keep it implicit
        return jnp.matmul(h, u) @ p["w"].T
    p = {"w": jax.random.normal(key, (5, 7)), "v": jax.random.normal(key, (7, 9)),
         "u": jax.random.normal(key, (9, 7))}
    x = jax.random.normal(key, (3, 5))
    lp = check_lora_matches_merged(fn, p, (x,), key=key, targets=["w", "v", "u"])
    lj.lora(fn, strict=True)(lp, x)


def test_unknown_primitive_warns_once_then_strict_raises(key):
    fn = lambda p, x: x @ jnp.sin(p["w"])
    p = {"w": jax.random.normal(key, (5, 7))}
    x = jax.random.normal(key, (3, 5))
    lp = randomize_b(lj.lorafy(p, rank=2, targets="w"), key)
    f = lj.lora(fn)
    with pytest.warns(lj.MaterializationWarning, match="'sin'"):
        y = f(lp, x)
    close(y, fn(lj.merge(lp), x), 1e-5)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(lp, x)                               # second call: already warned
    with pytest.raises(lj.MaterializationError, match="'sin'"):
        lj.lora(fn, strict=True)(lp, x)


def test_composition_jit_inside_vmap_grad(key):
    p = {"w": jax.random.normal(key, (5, 7))}
    lp = randomize_b(lj.lorafy(p, rank=2, targets="w"), key)
    x = jax.random.normal(key, (4, 3, 5))
    inner = jax.jit(lambda p, x: jnp.tanh(x @ p["w"]))
    ref = jax.vmap(lambda x: inner(lj.merge(lp), x))(x)
    close(lj.lora(inner)(lp, x), inner(lj.merge(lp), x), 1e-5)          # lora(jit(f))
    close(jax.jit(lj.lora(inner))(lp, x), ref.reshape(4, 3, 7), 1e-5)    # jit(lora(f))
    close(jax.vmap(lambda x: lj.lora(inner)(lp, x))(x), ref, 1e-5)       # vmap(lora(f))
    close(lj.lora(jax.vmap(inner, in_axes=(None, 0)))(lp, x), ref, 1e-5)  # lora(vmap(f))
    # per-example adapters: vmap over the LoraWeight's B
    bs = jax.random.normal(key, (4, 2, 7))
    per = jax.vmap(lambda b, x: lj.lora(inner)({"w": lp["w"].__class__(
        lp["w"].w0, lp["w"].a, b, alpha=lp["w"].alpha)}, x))(bs, x)
    for i in range(4):
        wi = lj.LoraWeight(lp["w"].w0, lp["w"].a, bs[i], alpha=lp["w"].alpha)
        close(per[i], inner({"w": wi.materialize()}, x[i]), 1e-5)


def test_static_python_args_and_kwargs(key):
    def fn(p, x, *, scale, act="tanh"):
        h = x @ p["w"] * scale
        return jnp.tanh(h) if act == "tanh" else h
    p = {"w": jax.random.normal(key, (5, 7))}
    lp = randomize_b(lj.lorafy(p, rank=2, targets="w"), key)
    x = jax.random.normal(key, (3, 5))
    f = lj.lora(fn)
    for act in ("tanh", "id"):
        close(f(lp, x, scale=2.0, act=act), fn(lj.merge(lp), x, scale=2.0, act=act), 1e-5)


def test_nnx_model(key):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(5, 9, rngs=rngs)
            self.l2 = nnx.Linear(9, 7, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.relu(self.l1(x)))

    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    x = jax.random.normal(key, (3, 5))

    def fn(p, x):
        st = nnx.State(state)
        nnx.replace_by_pure_dict(st, p)
        return nnx.merge(graphdef, st)(x)

    lp = check_lora_matches_merged(fn, params, (x,), key=key, targets="kernel")
    lj.lora(fn, strict=True)(lp, x)


def test_equinox_mlp(key):
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(5, 7, width_size=9, depth=2, key=key)
    params, static = eqx.partition(model, eqx.is_array)
    x = jax.random.normal(key, (3, 5))

    def fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    is_weight = lambda path, leaf: path.endswith("weight")
    lp = check_lora_matches_merged(fn, params, (x,), key=key, targets=is_weight)
    lj.lora(fn, strict=True)(lp, x)


def test_rslora_and_patterns(key):
    p = {"q": {"kernel": jnp.ones((11, 13))}, "v": {"kernel": jnp.ones((11, 13))}}
    lp = lj.lorafy(p, rank=4, alpha=8, rslora=True, rank_pattern={"^v": 2},
                   alpha_pattern={"^v": 3.0})
    assert lp["q"]["kernel"].rank == 4 and lp["q"]["kernel"].scale == pytest.approx(8 / 2)
    assert lp["v"]["kernel"].rank == 2 and lp["v"]["kernel"].scale == pytest.approx(3 / 2 ** 0.5)
    plain = lj.lorafy(p, rank=4, alpha=8)
    assert plain["q"]["kernel"].scale == 2.0
    assert lj.lorafy(p, rank=4)["q"]["kernel"].scale == 1.0     # default alpha = rank


def test_inits(key):
    p = {"kernel": jnp.zeros((401, 301))}
    a = lj.lorafy(p, rank=8, key=key)["kernel"].a
    bound = 1 / 401 ** 0.5
    assert float(jnp.max(jnp.abs(a))) <= bound
    assert float(jnp.std(a)) == pytest.approx(bound / 3 ** 0.5, rel=0.05)   # uniform std
    g = lj.lorafy(p, rank=8, key=key, init="gaussian")["kernel"]
    assert float(jnp.std(g.a)) == pytest.approx(1 / 8, rel=0.05)
    assert not np.any(np.asarray(g.b))
    a2 = lj.lorafy(p, rank=8, key=jax.random.key(1))["kernel"].a
    assert not np.allclose(a, a2)


def test_empty_leaves_are_not_default_targets_and_are_refused_by_name():
    params = {"extra": {"kernel": jnp.ones((0, 7))}, "proj": {"kernel": jnp.ones((5, 7))}}
    lp = lj.lorafy(params, rank=2)
    assert isinstance(lp["proj"]["kernel"], lj.LoraWeight)
    assert not isinstance(lp["extra"]["kernel"], lj.LoraWeight)
    with pytest.raises(ValueError, match=r"'extra/kernel' of shape \(0, 7\) is empty"):
        lj.lorafy(params, rank=2, targets="extra")
    with pytest.raises(ValueError, match=r"every default target \(\['extra/kernel'\]\) is empty"):
        lj.lorafy({"extra": {"kernel": jnp.ones((7, 0))}}, rank=2)
