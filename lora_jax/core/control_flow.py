"""Rules that carry nodes into control flow, registered for every node type.

Each construct is rebuilt around the interpreter so nodes keep flowing inside
it: nested ``jit`` is inlined, ``remat`` is re-wrapped in ``jax.checkpoint``
with its policy (its memory behaviour is kept), ``scan`` re-runs its body under
``lax.scan`` with the nodes as ``xs`` (scan slices each node's leaves itself),
``cond``/``switch`` and ``while`` re-run their branches and bodies. A node may
also be carried through a loop or returned from a branch, as Flax NNX does
with module state; only when the body returns something the construct cannot
carry (a changed node type, a dense array) is it formed, and reported.
"""

from __future__ import annotations

import functools

import jax
from jax import lax

from lora_jax.core import compat
from lora_jax.core.implicit import ImplicitArray
from lora_jax.core.interpreter import MaterializationError
from lora_jax.core.registry import register

_CARRY_WHY = ("is carried through a {what} whose body changes its structure, so the loop "
              "cannot carry it as a node.")


def _dense_outs(outs, ctx, what):
    return [ctx.form(o, _CARRY_WHY.format(what=what)) for o in outs]


def _nodes_or_dense(run):
    """``run(keep_nodes=True)``; if the construct rejects a node in its carry or
    branch outputs (a structure mismatch), ``run(keep_nodes=False)``."""
    try:
        return run(True)
    except MaterializationError:
        raise
    except TypeError as e:
        if not any(w in str(e) for w in ("carry", "branch", "body_fun", "structure")):
            raise
        return run(False)


def _jit_rule(eqn, invals, ctx):
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    jaxpr, consts = compat.open_jaxpr(inner)
    return ctx.eval(jaxpr, consts, invals)


def _remat_rule(eqn, invals, ctx):
    jaxpr, consts = compat.open_jaxpr(eqn.params["jaxpr"])

    def run(*args):
        ctx.carry_names(args, invals)
        return ctx.eval(jaxpr, consts, args)

    body = jax.checkpoint(run, prevent_cse=eqn.params.get("prevent_cse", True),
                          policy=eqn.params.get("policy"))
    return body(*invals)


def _scan_rule(eqn, invals, ctx):
    p = eqn.params
    n_consts, n_carry = compat.scan_counts(p, len(invals))
    jaxpr, jconsts = compat.open_jaxpr(p["jaxpr"])
    consts = invals[:n_consts]
    init = invals[n_consts:n_consts + n_carry]
    xs = [_sliceable(x, p["length"], ctx) for x in invals[n_consts + n_carry:]]

    # Dropout: each iteration draws from its own key (one of ``split(next_key(), length)``).
    keys = [jax.random.split(ctx.next_key(), p["length"])] if ctx.dropout else []

    def run(keep):
        def body(carry, x):
            x, k = (x[:-1], x[-1]) if keys else (x, ctx.key)
            ctx.carry_names([*carry, *x], [*init, *xs])
            with ctx.key_scope(k):
                outs = ctx.eval(jaxpr, jconsts, [*consts, *carry, *x])
            # Stacked outputs may be nodes too: scan stacks their leaves (NNX returns
            # the scanned modules' state this way).
            return (outs[:n_carry], outs[n_carry:]) if keep else \
                (_dense_outs(outs[:n_carry], ctx, "scan"), _dense_outs(outs[n_carry:], ctx, "scan"))

        start = init if keep else _dense_outs(init, ctx, "scan")
        carry, ys = lax.scan(body, start, [*xs, *keys], length=p["length"], reverse=p["reverse"],
                             unroll=p.get("unroll", 1))
        return [*carry, *ys]

    return _nodes_or_dense(run)


def _sliceable(x, length: int, ctx):
    """``x``, or ``x`` formed (and reported) when scan cannot slice it as a node: its
    layout has no stacked axis, or a leaf lacks the scanned leading axis."""
    if not isinstance(x, ImplicitArray):
        return x
    if getattr(x, "stack_ndim", None) != 0 and all(
            getattr(leaf, "shape", (None,))[:1] == (length,) for leaf in jax.tree.leaves(x)):
        return x
    return ctx.form(x, f"is scanned over (lax.scan slices its leading axis, {length} long), but "
                       "its layout has no stacked axis. Build the adapter with lorafy(..., "
                       "fn=fn, args=example_args) so its layout is read off how fn uses it "
                       "(or pass layout= with a stacked axis).")


def _cond_rule(eqn, invals, ctx):
    index, *ops = invals

    def branch(closed, keep, *args):
        ctx.carry_names(args, ops)
        jaxpr, consts = compat.open_jaxpr(closed)
        outs = ctx.eval(jaxpr, consts, args)
        return outs if keep else _dense_outs(outs, ctx, "cond/switch")

    def run(keep):
        branches = [functools.partial(branch, br, keep) for br in eqn.params["branches"]]
        return lax.switch(index, branches, *ops)

    return _nodes_or_dense(run)


def _while_rule(eqn, invals, ctx):
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cconsts, bconsts = invals[:nc], invals[nc:nc + nb]
    init = invals[nc + nb:]
    cj, cjc = compat.open_jaxpr(p["cond_jaxpr"])
    bj, bjc = compat.open_jaxpr(p["body_jaxpr"])

    def run(keep):
        def cond_fun(c):
            return ctx.eval(cj, cjc, [*cconsts, *c])[0]

        def body_fun(c):
            ctx.carry_names(c, init)
            outs = ctx.eval(bj, bjc, [*bconsts, *c])
            return outs if keep else _dense_outs(outs, ctx, "while_loop")

        start = init if keep else _dense_outs(init, ctx, "while_loop")
        return lax.while_loop(cond_fun, body_fun, start)

    return _nodes_or_dense(run)


def _passthrough_rule(eqn, invals, ctx):
    if len(invals) != 1:
        return NotImplemented
    return invals if eqn.primitive.multiple_results else invals[0]


def _barrier_rule(eqn, invals, ctx):
    """``optimization_barrier`` over nodes holds every leaf of them: the nodes come back."""
    leaves, treedef = jax.tree.flatten(list(invals))
    return jax.tree.unflatten(treedef, compat.bind(eqn, *leaves))


def _convert_rule(eqn, invals, ctx):
    (w,) = invals
    try:
        return w.astype(eqn.params["new_dtype"])
    except NotImplementedError:
        return NotImplemented


for _name in compat.JIT_NAMES:
    register(_name, ImplicitArray, _jit_rule)
for _name in compat.REMAT_NAMES:
    register(_name, ImplicitArray, _remat_rule)
register("scan", ImplicitArray, _scan_rule)
register("cond", ImplicitArray, _cond_rule)
register("while", ImplicitArray, _while_rule)
register("copy", ImplicitArray, _passthrough_rule)
register("copy_p", ImplicitArray, _passthrough_rule)
register("convert_element_type", ImplicitArray, _convert_rule)
register("optimization_barrier", ImplicitArray, _barrier_rule)
