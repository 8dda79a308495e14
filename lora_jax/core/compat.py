"""Every JAX-internals difference between the versions we support, in one place.

Tested: JAX 0.10.x (Python 3.11) and 0.12.x (Python 3.12); the GPU image runs 0.11.
"""

from __future__ import annotations

import contextlib

import jax
from jax.extend import core as jex_core
from jax.sharding import AxisType

ClosedJaxpr = jex_core.ClosedJaxpr
Literal = jex_core.Literal


def explicit_axes(mesh) -> tuple[bool, ...]:
    """Per axis of ``mesh``, whether it is explicit; empty for a mesh without axis types."""
    return tuple(t == AxisType.Explicit for t in getattr(mesh, "axis_types", None) or ())


def open_jaxpr(j):
    """(jaxpr, consts) from a ClosedJaxpr (0.10) or an open Jaxpr (0.12 scan)."""
    if isinstance(j, ClosedJaxpr):
        return j.jaxpr, list(j.consts)
    return j, []


def scan_counts(params, n_in: int) -> tuple[int, int]:
    """(num_consts, num_carry) of a scan eqn with ``n_in`` operands.

    Explicit params in 0.10; in 0.12 a FlatTree ``ft_in`` whose three groups are
    consts, carry and xs (the consts group may itself be nested).
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].update(list(range(n_in))).unpack()
    return len(list(_leaves(consts))), len(list(_leaves(carry)))


def _leaves(group):
    for x in group:
        if isinstance(x, int):
            yield x
        else:
            yield from _leaves(x)


def bind(eqn, *args):
    """``eqn.primitive.bind`` with the eqn's params, as ``jax.core.eval_jaxpr`` does it."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):             # older API: (subfuns, params)
        subfuns, params = params
        args = (*subfuns, *args)
    with eqn_context(eqn):
        return eqn.primitive.bind(*args, **params)


def eqn_context(eqn):
    ctx = getattr(eqn, "ctx", None)
    manager = getattr(ctx, "manager", None)
    return manager if manager is not None else contextlib.nullcontext()


def vjp_only(values) -> bool:
    """Whether reverse-mode AD (``grad``, ``vjp``) traces ``values`` and nothing runs them forward.

    True when, walking out from some value's own trace, a linearize trace built for a vjp comes
    before any staging boundary (``jit``, ``checkpoint``, ...), and no value meets a forward-mode
    trace (``jvp``, ``jacfwd``, ``jax.linearize``) on the way; ``vmap`` is looked through.
    A ``custom_vjp`` bound there is safe (JAX cannot run one forward): that vjp turns it into
    plain code at once. Behind a boundary it would be staged into a cached jaxpr that a later
    ``jvp`` of the same ``jit`` could meet, so there the answer is False, as for anything
    unrecognised.
    """
    found = False
    for x in values:
        trace = getattr(x, "_trace", None)
        while trace is not None:
            kind = type(trace).__name__
            if kind == "LinearizeTrace" and getattr(trace, "is_vjp", False):
                found = True
            elif kind == "JVPTrace" or kind == "LinearizeTrace":
                return False
            elif kind != "BatchTrace":
                break                      # a staging boundary, or a trace we do not know
            trace = getattr(trace, "parent_trace", None)
    return found


# Primitive names that moved between versions.
JIT_NAMES = frozenset({"pjit", "jit", "closed_call", "core_call"})
REMAT_NAMES = frozenset({"checkpoint", "remat", "remat2"})
CUSTOM_NAMES = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr",
                          "custom_lin"})


def manual_type(*xs) -> dict:
    """ShapeDtypeStruct keywords giving a value made of ``xs`` their shard_map
    type: the mesh and every manual axis any of them varies over ({} outside a body, or where
    types carry no such thing)."""
    avals = [jax.typeof(x) for x in xs]
    mats = [getattr(a, "manual_axis_type", None) for a in avals]
    if not mats or any(m is None for m in mats) or all(m.empty for m in mats):
        return {}
    mesh = avals[0].sharding.mesh
    return {"sharding": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
            "manual_axis_type": mats[0].update(
                varying=frozenset().union(*(m.varying for m in mats)))}


def varying_axes(x) -> frozenset:
    """The manual axes ``x`` varies over inside a ``shard_map`` body (its type's vma)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)       # 0.10 and 0.12; older: vma
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))
