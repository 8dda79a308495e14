"""``t · B``, the adapter's second factor, with the backward pass XLA:CPU keeps in place.

JAX transposes ``y = einsum(t, B)`` w.r.t. ``B`` as ``transpose(dot(dy, t))``: the output
gradient is the left operand, contracted over its token axes. XLA:CPU answers with a
transposed ``[out, tokens]`` copy of ``dy`` for every adapted projection, every layer, every
step (7 per SmolLM2 layer, about 13% of its grad step). Written as ``dot(t, dy)`` the same
contraction reads ``dy`` in place.

The ``custom_vjp`` that writes it so cannot be run forward (``jvp``, ``jacfwd``,
``jax.linearize``), so it is used only when the call is traced for reverse mode alone
(:func:`lora_jax.core.compat.vjp_only`); otherwise this is the plain einsum.

Inside a ``shard_map`` body (``lora(fn)`` called there) an operand may be replicated over
manual axes the other varies over; JAX's own transpose sums its cotangent over them
(``pvary`` -> ``psum``), so the backward does the same (:func:`_sum_to`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lora_jax.core import compat


def einsum(a, la, b, lb, out, **kw):
    return jnp.einsum(f"{''.join(la)},{''.join(lb)}->{''.join(out)}", a, b, **kw)


def factor_dot(t, t_l, b, b_l, out, *, precision=None, preferred_element_type=None,
               vjp_only: bool = False):
    """``einsum(t, B)`` over the label lists ``t_l``, ``b_l`` -> ``out``."""
    spec = (tuple(t_l), tuple(b_l), tuple(out), precision, preferred_element_type)
    return (_vjp if vjp_only and not _explicit(t, b) else _plain)(t, b, spec)


def _explicit(*xs) -> bool:
    """Whether any operand is sharded on explicit mesh axes. There the backward's contractions
    would need output shardings spelled out, which JAX's own transpose does; keep that."""
    return any(any(compat.explicit_axes(jax.typeof(x).sharding.mesh)) for x in xs)


def _plain(t, b, spec):
    t_l, b_l, out, precision, pet = spec
    return einsum(t, t_l, b, b_l, out, precision=precision, preferred_element_type=pet)


_vjp = functools.partial(jax.custom_vjp, nondiff_argnums=(2,))(_plain)


def _fwd(t, b, spec):
    return _plain(t, b, spec), (t, b)


def _bwd(spec, res, dy):
    t_l, b_l, out, precision, _ = spec
    t, b = res
    # a preferred_element_type wider than t's: contract in dy's precision, as JAX would
    tw, bw = t.astype(dy.dtype), b.astype(dy.dtype)
    dt = einsum(dy, out, bw, b_l, t_l, precision=precision)
    db = einsum(tw, t_l, dy, out, b_l, precision=precision)     # dot(t, dy): dy in place
    return _sum_to(dt.astype(t.dtype), t), _sum_to(db.astype(b.dtype), b)


def _sum_to(ct, primal):
    """``ct`` summed over the manual axes it varies over and ``primal`` does not: the
    cotangent of a value replicated over them, of the same type as ``primal``."""
    extra = compat.varying_axes(ct) - compat.varying_axes(primal)
    return jax.lax.psum(ct, tuple(sorted(extra, key=str))) if extra else ct


_vjp.defvjp(_fwd, _bwd)
