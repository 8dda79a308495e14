"""A node type of the user's own, added without touching the interpreter.

``Scaled(value, factor)`` stands for ``value * factor``. Its rules are registered
exactly as the built-in ones are; control flow (jit, scan, cond, remat) carries it
through the generic rules, and a primitive with no rule forms it, silently since it
has no trainable fields.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from lora_jax.core import ImplicitArray, interpret, node, register


@node
@dataclasses.dataclass(frozen=True)
class Scaled(ImplicitArray):
    value: jax.Array
    factor: jax.Array

    shape = property(lambda self: tuple(self.value.shape))
    dtype = property(lambda self: self.value.dtype)

    def materialize(self):            # factor [*S] scales each stacked slice of value [*S, ...]
        f = self.factor
        return self.value * f.reshape(f.shape + (1,) * (self.value.ndim - f.ndim))


CALLS = []


@register("dot_general", Scaled)
def _dot(eqn, invals, ctx):
    x, w = invals
    if not isinstance(w, Scaled) or isinstance(x, ImplicitArray):
        return NotImplemented
    CALLS.append("dot")
    return jax.lax.dot_general(x, w.value, eqn.params["dimension_numbers"]) * w.factor


@register("neg", Scaled)
def _neg(eqn, invals, ctx):
    (w,) = invals
    return Scaled(w.value, -w.factor)


def _w(key=0):
    return Scaled(jax.random.normal(jax.random.key(key), (5, 7)), jnp.float32(3.0))


def test_user_rules_run_and_keep_the_node():
    w, x = _w(), jnp.ones((2, 5))
    CALLS.clear()
    y = jax.jit(interpret(lambda w, x: x @ -w))(w, x)
    np.testing.assert_allclose(y, x @ -(w.value * 3.0), rtol=1e-6)
    assert CALLS == ["dot"]
    out = interpret(lambda w: -w)(w)
    assert isinstance(out, Scaled) and float(out.factor) == -3.0


def test_control_flow_carries_a_user_node():
    ws = Scaled(jax.random.normal(jax.random.key(1), (3, 5, 5)), jnp.array([0.5, -1.0, 2.0]))
    w, x = _w(), jnp.ones((2, 5))

    def f(ws, w, x):
        def body(h, w):
            return jnp.tanh(jax.checkpoint(lambda h, w: h @ w)(h, w)), None
        h = jax.lax.scan(body, x, ws)[0]
        return jax.lax.cond(h.sum() > 0, lambda w: h @ w, lambda w: -h @ w, w)

    CALLS.clear()
    got = jax.jit(interpret(f, strict=True))(ws, w, x)
    np.testing.assert_allclose(got, f(ws.materialize(), w.materialize(), x), rtol=1e-5, atol=1e-6)
    assert CALLS.count("dot") == 3       # scan body once, each cond branch once


def test_unregistered_primitive_forms_the_node_silently():
    w = _w()
    y = interpret(lambda w: jnp.sin(w))(w)                  # no rule: formed, no warning
    np.testing.assert_allclose(y, jnp.sin(w.value * 3.0), rtol=1e-6)


def test_register_rejects_bad_arguments():
    with pytest.raises(TypeError, match="ImplicitArray subclass"):
        register("mul", int, lambda *a: None)
    with pytest.raises(TypeError, match="rule must be callable"):
        register("mul", Scaled, 3)
    assert lj.register is register
