"""The frozen base under lora(): no gradient, and no copy of it kept for the backward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj

L, T, D = 3, 5, 64     # 64: NF4 blocks; the activations are [5, 64], the stack [3, 64, 64]


def scanned(params, x):
    def body(h, w):
        return jnp.tanh(h @ w), None

    h, _ = jax.lax.scan(body, x, params["w"])
    return jnp.sum(h * h)


@pytest.fixture
def adapted(key):
    w = jax.random.normal(key, (L, D, D)) / 8
    p = lj.lorafy({"w": w}, rank=3, targets="w", layout={"w": (1, (0,))}, key=key)
    return p


def weight_sized_residuals(f, arg, w0):
    """The residuals a vjp of ``f`` keeps that look like a (stacked) weight, other than w0
    itself (a residual may be the frozen input array, passed through: not a copy)."""
    _, vjp = jax.vjp(f, arg)
    res = [r for r in jax.tree.leaves(vjp) if isinstance(r, jax.Array)]
    assert res, "the vjp keeps residuals (the check can see them)"
    return [r.shape for r in res if r.shape in ((L, D, D), (D, D)) and r is not w0]


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_a_scanned_step_keeps_no_copy_of_the_frozen_weights(adapted, key, quant):
    p = adapted if quant is None else lj.lorafy(
        lj.quantize({"w": adapted["w"].w0}, quant, targets="w"), rank=3, targets="w",
        layout={"w": (1, (0,))}, key=key)
    tr, fr = lj.split(p)
    x = jax.random.normal(key, (T, D))
    f = lj.lora(scanned)
    # With stop_gradient inside the scanned body JAX kept a stacked copy of w0 (or of the
    # dequantized NF4 weights) as a residual.
    assert weight_sized_residuals(lambda t: f(lj.combine(t, fr), x), tr, fr["w"].w0) == []


def test_the_base_gets_no_gradient_even_when_differentiated(adapted, key):
    p = {"w": dataclasses.replace(adapted["w"], b=adapted["w"].b + 0.1)}
    x = jax.random.normal(key, (T, D))
    g = jax.grad(lj.lora(scanned))(p, x)["w"]
    assert not np.any(g.w0), "w0 is frozen"
    assert np.any(g.a) and np.any(g.b)
    # ...and the value is the merged model's
    np.testing.assert_allclose(lj.lora(scanned)(p, x), scanned(lj.merge(p), x), rtol=1e-5)
