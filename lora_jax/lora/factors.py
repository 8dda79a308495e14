"""Initial LoRA factors, as PEFT's ``init_lora_weights`` draws them.

For a weight with input axes I (fan_in = prod(I)) and output axes O (fan_out):

* ``"kaiming"`` / ``True`` (PEFT's default): A ~ U(+-1/sqrt(fan_in)) (``nn.Linear``'s
  init), B = 0.
* ``"gaussian"``: A ~ N(0, 1/r^2), B = 0.
* ``"orthogonal"`` (PEFT's, r even): Q from the QR of an r x r Gaussian;
  A = G_in @ Q[0::2] / 10, B = Q[1::2]^T @ G_out / 10 with Gaussian G_in [fan_in, r/2],
  G_out [r/2, fan_out]. Both are nonzero, yet A @ B = 0 because the even and odd
  rows of Q are orthogonal.
* ``False``: both random, as PEFT leaves the ``nn.Linear`` defaults: A ~
  U(+-1/sqrt(fan_in)), B ~ U(+-1/sqrt(r)); the adapter changes the model from step 0.

Embedding tables (leaves a function only gathers rows of) follow PEFT's
``nn.Embedding`` LoRA: the vocabulary-side factor (the one on the table's row axis)
is zero and the other N(0, 1) for every init but ``False``, which draws both N(0, 1).
Every init but ``False`` starts with A @ B = 0, i.e. at the base model.

Example:
    >>> import jax
    >>> a, b, _ = init_factors(jax.random.key(0), (7, 5), 4, (0, (0,)), "orthogonal",
    ...                        "float32", embedding=False)
    >>> a.shape, b.shape, float(abs(a @ b).max()) < 1e-6, float(abs(b).max()) > 0
    ((7, 4), (4, 5), True, True)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

INITS = ("kaiming", "gaussian", "orthogonal", True, False)


class RankWarning(UserWarning):
    """A LoRA rank above min(in, out) of a weight: accepted (PEFT accepts it), but the
    update ``A @ B`` has rank at most min(in, out), so the extra rank only adds parameters."""


def check_init(what: str, init) -> None:
    if init is True or init is False or (isinstance(init, str) and init in INITS):
        return
    raise ValueError(f"{what}: unknown init {init!r}; choose one of \"kaiming\" (or True), "
                     "\"gaussian\", \"orthogonal\" or False (PEFT's init_lora_weights).")


def _orthogonal(k, lead: tuple, fan_in: int, fan_out: int, r: int, path: str):
    if r % 2:
        raise ValueError(f"lorafy: init=\"orthogonal\" needs an even rank, but leaf {path!r} "
                         f"has rank {r}; use an even rank (PEFT requires the same).")
    kq, ka, kb = jax.random.split(k, 3)
    q, _ = jnp.linalg.qr(jax.random.normal(kq, (*lead, r, r), jnp.float32))
    q_odd, q_even = q[..., 0::2, :], q[..., 1::2, :]           # [*S, r/2, r] each
    g_in = jax.random.normal(ka, (*lead, fan_in, r // 2), jnp.float32)
    g_out = jax.random.normal(kb, (*lead, r // 2, fan_out), jnp.float32)
    a = g_in @ q_odd / 10.0
    b = jnp.swapaxes(q_even, -1, -2) @ g_out / 10.0
    return a, b


def _embedding(k, a_shape, b_shape, init, vocab_is_a: bool):
    ka, kb = jax.random.split(k)
    if init is False:
        return jax.random.normal(ka, a_shape, jnp.float32), jax.random.normal(kb, b_shape,
                                                                               jnp.float32)
    if vocab_is_a:
        return jnp.zeros(a_shape, jnp.float32), jax.random.normal(kb, b_shape, jnp.float32)
    return jax.random.normal(ka, a_shape, jnp.float32), jnp.zeros(b_shape, jnp.float32)


def init_factors(k, shape: tuple, r: int, lay, init, dtype, *, embedding: bool, path: str = ""):
    """``(a [*S, *I, r], b [*S, r, *O], rank_too_big)`` for a weight of ``shape`` with
    layout ``lay = (stack_ndim, in_axes)``."""
    s, in_axes = lay
    rest = shape[s:]
    i_shape = tuple(rest[j] for j in in_axes)
    o_shape = tuple(d for j, d in enumerate(rest) if j not in in_axes)
    fan_in, fan_out = math.prod(i_shape), math.prod(o_shape)
    lead = tuple(shape[:s])
    a_shape, b_shape = (*lead, *i_shape, r), (*lead, r, *o_shape)
    if embedding:
        a, b = _embedding(k, a_shape, b_shape, init, vocab_is_a=0 in in_axes)
    elif init == "orthogonal":
        a, b = _orthogonal(k, lead, fan_in, fan_out, r, path)
        a, b = a.reshape(a_shape), b.reshape(b_shape)
    else:
        if init == "gaussian":
            a = jax.random.normal(k, a_shape, jnp.float32) / r
        else:
            bound = 1.0 / math.sqrt(fan_in)
            a = jax.random.uniform(k, a_shape, jnp.float32, -bound, bound)
        if init is False:
            bound = 1.0 / math.sqrt(r)
            b = jax.random.uniform(jax.random.fold_in(k, 1), b_shape, jnp.float32, -bound, bound)
        else:
            b = jnp.zeros(b_shape, jnp.float32)
    return a.astype(dtype), b.astype(dtype), r > min(fan_in, fan_out)
