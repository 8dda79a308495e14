"""The rule that carries nodes into ``shard_map``, registered for every node type.

``shard_map`` splits each operand by a ``PartitionSpec`` and runs its body once per
shard. A node enters as its leaves, each with a spec derived from the node's own
(:func:`leaf_specs`), and the body rebuilds the nodes and re-runs the inner jaxpr
under the interpreter, so the node's rules run per shard::

    w0 [*S, ...]        the weight's spec, entry for entry
    a  [*S, *I, r]      the stacked and input axes' entries, None for r
    b  [*S, r, *O]      the stacked entries, None for r, the output axes' entries
    m  [*S, *O]         (DoRA) the stacked and output axes' entries

Sharding a weight along an input axis shards A the same way, so a shard's ``x @ A`` is
a partial sum, like its ``x @ W0``; the LoRA rule returns ``x@W0 + s*(x@A)@B`` per
shard, linear in those partials, and the body's own ``psum`` of the product sums both
parts: ``sum_k (x_k@W0_k + s*(x_k@A_k)@B) = x@W0 + s*(x@A)@B``.

Leaves that carry none of the weight's layer axes (a quantized base's packed codes and
scales, a user node's scalars) are split only along the stacked axes; when the spec
also splits a layer axis no leaf spec is known, and the node is formed before the
``shard_map`` (silently for a frozen base, reported for an adapter). A DoRA node whose
input axes are split is formed too: its column norm would be a per-shard partial.
Nodes the body returns are formed: ``out_specs`` describe arrays.

A sharding constraint on a node (``with_sharding_constraint(W, NamedSharding(mesh, spec))``,
FSDP-style code gathering a weight before its matmul; ``reshard`` with explicit axes)
constrains each leaf by the same derived spec.

Node types of one's own may register their leaf specs with :func:`register_specs`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import jax
from jax.sharding import PartitionSpec

from lora_jax.core import compat
from lora_jax.core.implicit import ImplicitArray, is_implicit
from lora_jax.core.registry import register

# ----------------------------------------------------------------------------- versions


def shard_map_fn() -> Callable:
    """``jax.shard_map`` (JAX >= 0.7), else ``jax.experimental.shard_map.shard_map``."""
    fn = getattr(jax, "shard_map", None)
    if fn is None:                                      # pragma: no cover - old JAX
        from jax.experimental.shard_map import shard_map as fn
    return fn


def _spec_of_names(names: dict, ndim: int) -> PartitionSpec:
    """A ``PartitionSpec`` from the ``{dim: axis names}`` of old eqns (``in_names``)."""
    entries = []
    for d in range(ndim):
        axes = tuple(names.get(d, ()))
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def eqn_specs(params, which: str, values_ndim) -> tuple:
    """The eqn's ``in_specs``/``out_specs`` (0.6+), or its ``in_names``/``out_names`` as specs."""
    specs = params.get(f"{which}_specs")
    if specs is not None:
        return tuple(specs)
    names = params[f"{which}_names"]                    # pragma: no cover - old JAX
    return tuple(_spec_of_names(n, k) for n, k in zip(names, values_ndim))


def manual_axes(params) -> frozenset:
    """The mesh axes the eqn makes manual (``newly_manual_axes``; older: all but ``auto``)."""
    if "newly_manual_axes" in params:
        return frozenset(params["newly_manual_axes"])
    if "axis_names" in params:                          # pragma: no cover
        return frozenset(params["axis_names"])
    return frozenset(params["mesh"].axis_names) - frozenset(params.get("auto", ()))


def call_kwargs(params, fn) -> dict:
    """Keyword arguments that rebuild the eqn's ``shard_map`` call (mesh, checks, manual axes)."""
    sig = inspect.signature(fn).parameters
    kw = {"mesh": params["mesh"]}
    check = params.get("check_vma", params.get("check_rep", True))
    kw["check_vma" if "check_vma" in sig else "check_rep"] = check
    mesh_axes = frozenset(params["mesh"].axis_names)
    manual = manual_axes(params)
    if manual != mesh_axes:
        if "axis_names" in sig:
            kw["axis_names"] = set(manual)
        else:                                           # pragma: no cover - old JAX
            kw["auto"] = mesh_axes - manual
    return kw



# ----------------------------------------------------------------------------- leaf specs


class NoSpec(Exception):
    """No leaf spec follows from the node's spec; the message says why (ends with '.')."""


Entries = tuple  # one PartitionSpec entry per axis of the node


_SPEC_RULES: dict[type, Callable] = {}


def register_specs(node_type: type, rule: Callable) -> Callable:
    """``rule(node, entries) -> [PartitionSpec per leaf of node]`` for ``node_type``'s
    nodes inside ``shard_map`` (``entries``: the node's spec, one entry per axis).
    Raise :class:`NoSpec` to have the node formed instead."""
    _SPEC_RULES[node_type] = rule
    return rule


def _entries(x, spec) -> Entries:
    if getattr(spec, "unreduced", None) or getattr(spec, "reduced", None):
        raise NoSpec(f"its spec {spec} has unreduced/reduced axes, which a node's factors "
                     "cannot take.")
    entries = tuple(spec)
    if len(entries) > x.ndim:
        raise NoSpec(f"its spec {spec} has more entries than its {x.ndim} axes.")
    return entries + (None,) * (x.ndim - len(entries))


def _stack_ndim(x) -> int:
    try:
        s = getattr(x, "stack_ndim", 0)
    except Exception:                                   # a half-built node
        return 0
    return s if isinstance(s, int) and 0 <= s <= x.ndim else 0


def _is_adapter(x) -> bool:
    """A node over ``w0`` with factors ``a`` [*S, ..., *I, r] and ``b`` [*S, ..., r, *O]."""
    try:
        return all(hasattr(x, n) for n in ("w0", "a", "b", "in_axes", "out_axes"))
    except Exception:
        return False


def _key_name(path) -> str | None:
    return getattr(path[0], "name", None) if path else None


def _children(x):
    """``(names, children, treedef)`` one level down: arrays and nested nodes."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        x, is_leaf=lambda v: v is not x and is_implicit(v))
    return [_key_name(p) for p, _ in flat], [v for _, v in flat], treedef


def _adapter_entries(x, name: str, v, entries: Entries) -> Entries:
    s = _stack_ndim(x)
    S, L = entries[:s], entries[s:]
    ins, outs = tuple(x.in_axes), tuple(x.out_axes)
    layer = tuple(x.shape[s:])
    if name == "a":
        extra = v.ndim - s - len(ins) - 1
        axes = ins
        want = tuple(layer[j] for j in ins)
        lead = v.shape[s + extra:s + extra + len(ins)] if extra >= 0 else None
        spec = (*S, *(None,) * max(extra, 0), *(L[j] for j in ins), None)
    else:                                               # b [*S, .., r, *O] or m [*S, .., *O]
        extra = v.ndim - s - len(outs) - (1 if name == "b" else 0)
        axes = outs
        want = tuple(layer[j] for j in outs)
        lead = v.shape[v.ndim - len(outs):] if extra >= 0 else None
        spec = (*S, *(None,) * max(extra, 0), *((None,) if name == "b" else ()),
                *(L[j] for j in outs))
    if extra < 0 or tuple(v.shape[:s]) != tuple(x.shape[:s]) or tuple(lead) != want:
        raise NoSpec(f"its factor {name!r} of shape {tuple(v.shape)} does not fit its "
                     f"shape {tuple(x.shape)} on axes {axes}.")
    if name == "m" and any(L[j] is not None for j in ins):
        raise NoSpec(f"its spec splits its input axes {ins}, over which DoRA's column norm "
                     "runs; each shard would divide by a partial norm.")
    return spec


def _child_entries(x, name, v, entries: Entries) -> Entries:
    adapter = _is_adapter(x)
    if adapter and name in ("a", "b", "m"):
        return _adapter_entries(x, name, v, entries)
    if tuple(v.shape) == tuple(x.shape):
        return entries
    s = _stack_ndim(x)
    what = f"its field {name!r}" if name else "a leaf"
    if adapter:
        raise NoSpec(f"{what} (shape {tuple(v.shape)}) has none of its axes, so how it is "
                     "split inside shard_map is unknown (per-row adapter ids follow the batch).")
    if all(e is None for e in entries[s:]) and tuple(v.shape[:s]) == tuple(x.shape[:s]):
        return (*entries[:s], *(None,) * (v.ndim - s))   # split along the stacked axes only
    raise NoSpec(f"{what} (shape {tuple(v.shape)}) does not have its layer axes "
                 f"{tuple(x.shape[s:])}, and its spec {PartitionSpec(*entries)} splits them.")


def _prepare(x, entries: Entries, ctx):
    """``(x', specs)``: ``x`` with nested frozen nodes that cannot be split formed (a
    quantized ``w0`` split along a layer axis is dequantized), and one spec per leaf of ``x'``."""
    rule = next((_SPEC_RULES[c] for c in type(x).__mro__ if c in _SPEC_RULES), None)
    if rule is not None:
        return x, [PartitionSpec(*e) for e in rule(x, entries)]
    names, children, treedef = _children(x)
    new, specs = [], []
    for name, v in zip(names, children):
        if is_implicit(v):
            if tuple(v.shape) != tuple(x.shape):
                raise NoSpec(f"its part {name!r} ({type(v).__name__} of shape "
                             f"{tuple(v.shape)}) does not have its shape {tuple(x.shape)}.")
            try:
                v, sub = _prepare(v, entries, ctx)
            except NoSpec as e:
                if type(v).trainable_fields:
                    raise
                v, sub = ctx.form(v, f"enters shard_map, where {e}"), [PartitionSpec(*entries)]
            new.append(v)
            specs.extend(sub)
        else:
            new.append(v)
            specs.append(PartitionSpec(*_child_entries(x, name, v, entries)))
    return jax.tree_util.tree_unflatten(treedef, new), specs


def leaf_specs(x, spec) -> list:
    """One ``PartitionSpec`` per leaf of node ``x`` (``jax.tree.leaves`` order) when ``x``
    enters a ``shard_map`` with ``spec``; :class:`NoSpec` says why none can be derived."""
    class _Formless:
        def form(self, v, why):
            raise NoSpec(why)
    return _prepare(x, _entries(x, spec), _Formless())[1]


# ----------------------------------------------------------------------------- rules

_WHY = "enters shard_map, where {}"
_OUT_WHY = ("is returned from a shard_map body; its out_specs describe arrays, so it is "
            "formed there.")


def _shard_map_rule(eqn, invals, ctx):
    p = eqn.params
    jaxpr, consts = compat.open_jaxpr(p["jaxpr"])
    in_specs = eqn_specs(p, "in", [x.ndim for x in invals])
    out_specs = eqn_specs(p, "out", [v.aval.ndim for v in eqn.outvars])

    ops, flat, specs = [], [], []
    for x, spec in zip(invals, in_specs):
        if is_implicit(x):
            try:
                x, leaf = _prepare(x, _entries(x, spec), ctx)
            except NoSpec as e:
                x, leaf = ctx.form(x, _WHY.format(e)), [spec]
        else:
            leaf = [spec]
        leaves, treedef = jax.tree.flatten(x)
        if len(leaves) != len(leaf):                   # a spec rule that miscounts
            raise ValueError(f"shard_map: {len(leaf)} leaf specs for {type(x).__name__} "
                             f"with {len(leaves)} leaves.")
        ops.append((treedef, len(leaves)))
        flat.extend(leaves)
        specs.extend(leaf)

    fn = shard_map_fn()
    kw = call_kwargs(p, fn)
    manual = tuple(sorted(manual_axes(p), key=str))
    key = ctx.next_key() if ctx.dropout and manual else None

    def body(*leaves):
        args, i = [], 0
        for treedef, n in ops:
            args.append(jax.tree.unflatten(treedef, leaves[i:i + n]))
            i += n
        ctx.carry_names(args, invals)
        # No custom_vjp in the body: JAX's own transpose sums a factor's cotangent over the
        # shards it is replicated on (pvary -> psum). Set here per body run, so nothing cached
        # carries it; factor_dot's backward sums the same way (for lora(f) inside a body).
        saved, ctx.vjp_only = ctx.vjp_only, False
        try:
            if key is None:
                outs = ctx.eval(jaxpr, consts, args)
            else:                                     # each shard its own dropout masks
                with ctx.key_scope(jax.random.fold_in(key, jax.lax.axis_index(manual))):
                    outs = ctx.eval(jaxpr, consts, args)
        finally:
            ctx.vjp_only = saved
        return tuple(ctx.form(o, _OUT_WHY) for o in outs)

    outs = fn(body, in_specs=tuple(specs), out_specs=tuple(out_specs), **kw)(*flat)
    return list(outs)


def _pvary_rule(eqn, invals, ctx):
    """``pvary`` (made varying over ``axes``) applied to each leaf not varying over them yet:
    a node's leaves have their own specs, so they may already vary over some."""
    axes = tuple(eqn.params["axes"])
    params = dict(eqn.params)

    def vary(leaf):
        missing = tuple(a for a in axes if a not in compat.varying_axes(leaf))
        if not missing:
            return leaf
        out = eqn.primitive.bind(leaf, **{**params, "axes": missing})
        return out[0] if eqn.primitive.multiple_results else out

    outs = [jax.tree.map(vary, x) if is_implicit(x) else vary(x) for x in invals]
    return outs if eqn.primitive.multiple_results else outs[0]


def _constraint_rule(eqn, invals, ctx):
    """``with_sharding_constraint`` / ``reshard`` of a node: each leaf by its derived spec."""
    (x,) = invals
    key = "sharding" if "sharding" in eqn.params else "dst_sharding"
    sharding = eqn.params.get(key)
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or mesh is None:
        return ctx.decline(f"meets a sharding constraint by {sharding}, which is not a "
                           "NamedSharding, so the spec of its factors is unknown.")
    try:
        x, specs = _prepare(x, _entries(x, spec), ctx)
    except NoSpec as e:
        return ctx.decline(f"meets a sharding constraint, where {e}")
    leaves, treedef = jax.tree.flatten(x)
    outs = []
    for leaf, leaf_spec in zip(leaves, specs, strict=True):
        params = dict(eqn.params)
        params[key] = type(sharding)(mesh, leaf_spec, memory_kind=sharding.memory_kind)
        if "unconstrained_dims" in params:
            params["unconstrained_dims"] = frozenset(
                i for i, e in enumerate(leaf_spec) if e is PartitionSpec.UNCONSTRAINED)
        with compat.eqn_context(eqn):
            outs.append(eqn.primitive.bind(leaf, **params))
    return jax.tree.unflatten(treedef, outs)


register("shard_map", ImplicitArray, _shard_map_rule)
register("sharding_constraint", ImplicitArray, _constraint_rule)
register("reshard", ImplicitArray, _constraint_rule)
register("pvary", ImplicitArray, _pvary_rule)
