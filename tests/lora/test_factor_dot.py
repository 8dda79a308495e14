"""The adapter's second factor: its own backward pass under reverse mode, plain otherwise.

Every transformation must still give the merged model's derivatives; under ``jit(grad)`` the
compiled XLA:CPU step must not write the output gradient transposed.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.core import compat
from lora_jax.lora.factor_dot import factor_dot

T, D, H, O = 11, 5, 13, 7


def mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]


@pytest.fixture
def setup(key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"w1": jax.random.normal(k1, (D, H)) / 3, "w2": jax.random.normal(k2, (H, O)) / 3}
    tr, fr = lj.split(lj.lorafy(params, rank=3, targets=("w1", "w2"), key=k1))
    tr = jax.tree.map(lambda a: a + 0.1, tr)           # B != 0: the adapter path counts
    x = jax.random.normal(k3, (T, D))

    def loss(f):
        return lambda tr, x: jnp.sum(jnp.sin(f(lj.combine(tr, fr), x)))

    return tr, x, loss, loss(lambda p, x: mlp(lj.merge(p), x))


TRANSFORMS = {
    "grad": lambda f, tr, x: jax.grad(f)(tr, x),
    "jit(grad)": lambda f, tr, x: jax.jit(jax.grad(f))(tr, x),
    "grad of x": lambda f, tr, x: jax.grad(f, 1)(tr, x),
    "vmap(grad)": lambda f, tr, x: jax.vmap(jax.grad(f), (None, 0))(tr, jnp.stack([x, 2 * x])),
    "grad(grad)": lambda f, tr, x: jax.grad(
        lambda t: sum(jnp.sum(g * g) for g in jax.tree.leaves(jax.grad(f)(t, x))))(tr),
    "jvp": lambda f, tr, x: jax.jvp(lambda t: f(t, x), (tr,), (jax.tree.map(jnp.ones_like, tr),)),
    "linearize": lambda f, tr, x: jax.linearize(lambda t: f(t, x), tr)[1](
        jax.tree.map(jnp.ones_like, tr)),
    "hessian of x": lambda f, tr, x: jax.hessian(f, 1)(tr, x),
    # w.r.t. the nodes: each leaf of the result is a whole tree of nodes holding blocks
    "hessian": lambda f, tr, x: jax.hessian(f)(tr, x),
    "jacfwd": lambda f, tr, x: jax.jacfwd(f)(tr, x),
    "jacrev": lambda f, tr, x: jax.jacrev(f)(tr, x),
    "jvp(grad)": lambda f, tr, x: jax.jvp(lambda x: jax.grad(f)(tr, x), (x,), (x,)),
    "jvp(jit(grad))": lambda f, tr, x: jax.jvp(jax.jit(lambda x: jax.grad(f)(tr, x)), (x,), (x,)),
}


@pytest.mark.parametrize("name", TRANSFORMS)
def test_every_transformation_gives_the_merged_models_derivatives(setup, name):
    tr, x, loss, merged = setup
    got, want = TRANSFORMS[name](loss(lj.lora(mlp)), tr, x), TRANSFORMS[name](merged, tr, x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("stage", [jax.jit, jax.checkpoint])
def test_forward_mode_after_reverse_mode_through_one_staged_function(setup, stage):
    """A staged function keeps its traced jaxpr: traced under grad first, it must not hold a
    custom_vjp that a later jvp of the same function would meet."""
    tr, x, loss, merged = setup
    adapted = loss(stage(lj.lora(mlp)))
    jax.grad(adapted)(tr, x)
    tangent = jax.tree.map(jnp.ones_like, tr)
    got = jax.jvp(lambda t: adapted(t, x), (tr,), (tangent,))[1]
    want = jax.jvp(lambda t: merged(t, x), (tr,), (tangent,))[1]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def _seen(transform, x):
    out = []

    def f(x):
        out.append(compat.vjp_only([x]))
        return jnp.sum(x * x)

    transform(f, x)
    return out[0]


@pytest.mark.parametrize("transform, expected", [
    (lambda f, x: f(x), False),
    (lambda f, x: jax.jit(f)(x), False),
    (lambda f, x: jax.grad(f)(x), True),
    (lambda f, x: jax.jit(jax.grad(f))(x), True),
    (lambda f, x: jax.vmap(jax.grad(f))(x[None]), True),
    (lambda f, x: jax.jvp(f, (x,), (x,)), False),
    (lambda f, x: jax.linearize(f, x), False),
    (lambda f, x: jax.hessian(f)(x), False),           # forward over reverse
    (lambda f, x: jax.jvp(jax.grad(f), (x,), (x,)), False),
    # behind a staging boundary the custom_vjp would sit in a cached jaxpr (test above)
    (lambda f, x: jax.grad(jax.jit(f))(x), False),
    (lambda f, x: jax.grad(jax.checkpoint(f))(x), False),
    (lambda f, x: jax.grad(lambda x: jax.vmap(f)(x[None]).sum())(x), True),
])
def test_reverse_mode_alone_is_recognised(transform, expected):
    assert _seen(transform, jnp.ones(3)) is expected


@pytest.mark.parametrize("pet", [None, jnp.float32])
def test_the_custom_backward_equals_autodiff_of_the_einsum(key, pet):
    """Multi-axis labels ([b, s, r] x [r, h, k]) and a bf16 input with an f32 output."""
    k1, k2, k3 = jax.random.split(key, 3)
    dtype = jnp.bfloat16 if pet else jnp.float32
    t = jax.random.normal(k1, (3, 5, 2), dtype)
    b = jax.random.normal(k2, (2, 7, 3), dtype)
    ct = jax.random.normal(k3, (3, 5, 7, 3), pet or dtype)
    spec = ("bsr", "rhk", "bshk")

    def run(vjp_only):
        y, vjp = jax.vjp(lambda t, b: factor_dot(t, spec[0], b, spec[1], spec[2],
                                                 preferred_element_type=pet,
                                                 vjp_only=vjp_only), t, b)
        return y, *vjp(ct)

    for got, want in zip(run(True), run(False), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=1e-2 if pet else 1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU layout choice")
@pytest.mark.parametrize("vjp_only", [True, False])
def test_a_scanned_step_writes_no_transposed_output_gradient(key, monkeypatch, vjp_only):
    """A SwiGLU block over [batch, seq] tokens. The plain einsum (vjp_only=False, the
    control) makes XLA:CPU write each projection's output gradient as [out, tokens]."""
    batch, seq, d, f = 4, 16, 24, 40
    names = ("gate", "up", "down")
    shapes = {"gate": (3, d, f), "up": (3, d, f), "down": (3, f, d)}
    params = {n: jax.random.normal(k, shapes[n]) / 5
              for n, k in zip(names, jax.random.split(key, 3))}
    p = lj.lorafy(params, rank=2, key=key, targets=names, layout={n: (1, (0,)) for n in names})
    tr, fr = lj.split(p)
    x = jax.random.normal(key, (batch, seq, d))

    def model(p, x):
        def body(h, w):
            return h + (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"], None
        return jnp.sum(jax.lax.scan(body, x, p)[0] ** 2)

    if not vjp_only:
        monkeypatch.setattr(compat, "vjp_only", lambda values: False)
    step = jax.jit(jax.grad(lambda t: lj.lora(model)(lj.combine(t, fr), x)))
    hlo = step.lower(tr).compile().as_text()
    transposed = re.findall(rf"= f32\[(?:{f}|{d}),{batch * seq}\]\{{1,0\}} fusion", hlo)
    if vjp_only:
        assert transposed == [], f"dy copied to [out, tokens] {len(transposed)} times"
    else:
        assert len(transposed) == 3, "the control shows the copies this check looks for"


@pytest.mark.parametrize("kind", ["dora", "qlora"])
def test_hessian_wrt_dora_and_quantized_base_nodes_equals_the_merged_models(key, kind):
    """Each node type unflattens the Hessian's blocks (none runs its constructor checks)."""
    k1, k2 = jax.random.split(key)
    params = {"w": jax.random.normal(k1, (64, 7)) / 8}     # 64: one NF4 block per column
    if kind == "dora":
        lp = lj.dorafy(params, rank=2, alpha=4.0, targets="w", key=k1)
    else:
        lp = lj.lorafy(lj.quantize(params, "nf4", targets="w"), rank=2, alpha=4.0,
                       targets="w", key=k1)
    tr, fr = lj.split(lp)
    tr = jax.tree.map(lambda a: a + 0.1, tr)
    x = jax.random.normal(k2, (3, 64))
    adapted = lj.lora(lambda p: jnp.sum(jnp.tanh(x @ p["w"])))
    got = jax.hessian(lambda t: adapted(lj.combine(t, fr)))(tr)
    want = jax.hessian(lambda t: jnp.sum(jnp.tanh(x @ lj.merge(lj.combine(t, fr))["w"])))(tr)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
