"""infer_layout: read each kernel's (stacked, input) axes off how fn uses it.

A shape cannot tell a scanned Dense (L, d, f) from a DenseGeneral (d, h, hd),
nor a conv kernel from a stacked matrix. The jaxpr can: a leaf sliced by
``scan`` has a stacked axis, the axes a ``dot_general`` contracts are inputs,
a conv kernel's inputs are everything but its output-feature axis.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> m = nn.Conv(7, (3, 3))
    >>> x = jnp.ones((1, 9, 9, 5))
    >>> p = m.init(jax.random.key(0), x)["params"]
    >>> infer_layout(lambda p, x: m.apply({"params": p}, x), p, x)
    {'kernel': (0, 3)}
"""

from __future__ import annotations

import jax

from lora_jax.core import compat as _compat
from lora_jax.core.tree import path_str
from lora_jax.core.implicit import is_implicit

# A tracked value: (leaf index, tuple mapping each axis to the leaf's axis or None, n_sliced)


def infer_layout(fn, params, *args, **kwargs) -> dict[str, tuple[int, int]]:
    """``{path: (stack_ndim, in_ndim)}`` for every ``params`` leaf ``fn`` contracts.

    Pass the result as ``lorafy(..., layout=...)`` / ``quantize(..., layout=...)``.
    ``fn(params, *args, **kwargs)`` is traced abstractly (no FLOPs). Leaves used
    in ways the (in, out) layout cannot express are left out (the default applies).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_implicit)
    paths = [path_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    avals = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]

    def flat_fn(*xs):
        return fn(jax.tree.unflatten(treedef, xs), *args, **kwargs)

    closed = jax.make_jaxpr(flat_fn)(*avals)
    found: dict[int, tuple[int, int]] = {}
    env_in = [(i, tuple(range(len(a.shape))), 0) for i, a in enumerate(avals)]
    _walk(closed.jaxpr, env_in, found)
    return {paths[i]: lay for i, lay in found.items()}


def _walk(jaxpr, in_tracks, found):
    env = {v: t for v, t in zip(jaxpr.invars, in_tracks) if t is not None}

    def get(v):
        return None if isinstance(v, _compat.Literal) else env.get(v)

    for eqn in jaxpr.eqns:
        tracks = [get(v) for v in eqn.invars]
        if not any(t is not None for t in tracks):
            continue
        name, p = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (lc, rc), (lb, rb) = p["dimension_numbers"]
            for t, c, b in ((tracks[0], lc, lb), (tracks[1], rc, rb)):
                if t is not None:
                    _record(t, c, b, found)
        elif name == "conv_general_dilated" and tracks[1] is not None:
            t = tracks[1]
            out_ax = p["dimension_numbers"].rhs_spec[0]
            _record(t, tuple(a for a in range(len(t[1])) if a != out_ax), (), found)
        elif name == "gather" and tracks[0] is not None:
            _record(tracks[0], tuple(p["dimension_numbers"].collapsed_slice_dims), (), found)
        elif name in ("convert_element_type", "copy", "copy_p") and tracks[0] is not None:
            env[eqn.outvars[0]] = tracks[0]
        elif name == "transpose" and tracks[0] is not None:
            i, amap, n = tracks[0]
            env[eqn.outvars[0]] = (i, tuple(amap[a] for a in p["permutation"]), n)
        elif name in _compat.JIT_NAMES or name in _compat.REMAT_NAMES or name in _compat.CUSTOM_NAMES:
            inner = p.get("jaxpr", p.get("call_jaxpr"))
            if inner is not None:
                j, _ = _compat.open_jaxpr(inner)
                _walk(j, tracks[len(tracks) - len(j.invars):], found)
        elif name == "scan":
            n_consts, n_carry = _compat.scan_counts(p, len(tracks))
            j, _ = _compat.open_jaxpr(p["jaxpr"])
            inner = list(tracks[:n_consts]) + [None] * n_carry
            for t in tracks[n_consts + n_carry:]:
                inner.append(None if t is None or not t[1] or t[1][0] is None
                             else (t[0], t[1][1:], t[2] + 1))
            _walk(j, inner, found)
        elif name == "cond":
            for br in p["branches"]:
                j, _ = _compat.open_jaxpr(br)
                _walk(j, tracks[1:], found)
        elif name == "while":
            nc, nb = p["cond_nconsts"], p["body_nconsts"]
            j, _ = _compat.open_jaxpr(p["body_jaxpr"])
            _walk(j, list(tracks[nc:nc + nb]) + [None] * (len(tracks) - nc - nb), found)


def _record(track, contract, batch, found):
    i, amap, n_sliced = track
    if i in found or any(amap[a] is None for a in (*contract, *batch)):
        return
    lead = sorted(amap[a] for a in batch)
    ins = sorted(amap[a] for a in contract)
    stack = n_sliced + len(lead)
    # The (in, out) layout needs [*stacked, *inputs, *outputs] in that order.
    if lead != list(range(n_sliced, stack)) or ins != list(range(stack, stack + len(ins))):
        return
    if stack + len(ins) >= len(amap) + n_sliced:
        return
    found[i] = (stack, len(ins))
