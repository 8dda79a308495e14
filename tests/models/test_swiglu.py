"""swiglu(): silu(gate) * up in value and gradients, keeping only gate and up."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models.llama import swiglu


def plain(gate, up):
    return nn.silu(gate) * up


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_value_and_gradients_equal_autodiff(key, dtype, tol):
    k1, k2, k3 = jax.random.split(key, 3)
    gate = (3 * jax.random.normal(k1, (3, 5, 7))).astype(dtype)
    up = jax.random.normal(k2, (3, 5, 7), dtype)
    w = jax.random.normal(k3, (3, 5, 7), dtype)
    y = swiglu(gate, up)
    assert y.dtype == dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(plain(gate, up), np.float32),
                               rtol=tol, atol=tol)
    got = jax.grad(lambda g, u: jnp.sum((swiglu(g, u) * w).astype(jnp.float32)), (0, 1))(gate, up)
    want = jax.grad(lambda g, u: jnp.sum((plain(g, u) * w).astype(jnp.float32)), (0, 1))(gate, up)
    for name, g, e in zip(("gate", "up"), got, want):
        assert g.dtype == dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32),
                                   rtol=tol, atol=tol, err_msg=f"d{name}")


def test_the_backward_keeps_gate_and_up_only(key):
    gate, up = jax.random.normal(key, (2, 5, 7)), jax.random.normal(key, (2, 5, 7)) + 1
    _, vjp = jax.vjp(swiglu, gate, up)
    res = [r for r in jax.tree.leaves(vjp) if isinstance(r, jax.Array) and r.shape == gate.shape]
    assert len(res) == 2 and any(r is gate for r in res) and any(r is up for r in res)
    _, vjp = jax.vjp(plain, gate, up)        # the control: autodiff keeps more
    assert len([r for r in jax.tree.leaves(vjp) if getattr(r, "shape", None) == gate.shape]) > 2
