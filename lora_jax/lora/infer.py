"""infer_layout: read each weight's (stacked, input) axes off how a function uses it.

A shape cannot tell a scanned Dense ``(L, d, f)`` from a DenseGeneral
``(d, h, hd)``, an ``(out, in)`` Equinox matrix from an ``(in, out)`` Flax one,
nor a conv kernel from a stacked matrix. The function can. Each parameter is
replaced by a probe node and ``fn`` runs abstractly under the same interpreter
as ``lora(fn)`` (so every control-flow construct it understands, this
understands); the probe's rules note which of the parameter's axes each
``dot_general``, convolution or gather contracts, batches, or indexes away.

Example:
    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> m = nn.Conv(7, (3, 3))
    >>> x = jnp.ones((1, 9, 9, 5))
    >>> p = m.init(jax.random.key(0), x)["params"]
    >>> infer_layout(lambda p, x: m.apply({"params": p}, x), p, x)
    {'kernel': (0, (0, 1, 2))}
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.core import (
    ImplicitArray,
    compat,
    dense,
    interpret,
    is_float_array,
    is_implicit,
    node,
    path_str,
    register,
    static,
)
from lora_jax.lora.layout import LayoutSpec, check_layout_spec, normalize, resolve_layout
from lora_jax.lora.rules import gathered_axes, scalar_operand, whole_slices


def _flat(entries) -> list:
    """Parameter axes of probe axis entries (an axis or a tuple of them), each once."""
    out = []
    for e in entries:
        for a in (e if isinstance(e, tuple) else (e,)):
            if a not in out:
                out.append(a)
    return out


@node
@dataclasses.dataclass(frozen=True)
class _Probe(ImplicitArray):
    """Stands for parameter ``leaf``; ``axes`` maps its axes to the parameter's.

    ``value`` (zeros) carries the current shape, so ``scan`` slicing shows: the
    leading ``len(axes) - value.ndim`` entries of ``axes`` are the sliced ones. An entry is
    a parameter axis, or a tuple of them after a ``reshape`` merged axes (``()`` for an axis
    the parameter does not have: a broadcast or size-1 axis).
    """

    value: Any
    leaf: int = static(0)
    axes: tuple = static(())
    indexed: tuple = static(())      # parameter axes removed by indexing (w[0])

    shape = property(lambda self: tuple(self.value.shape))
    dtype = property(lambda self: self.value.dtype)

    def current(self) -> tuple:
        return self.axes[len(self.axes) - self.value.ndim:]

    def head(self) -> tuple:
        return self.axes[:len(self.axes) - self.value.ndim]

    def stacked(self) -> list:
        return _flat([*self.head(), *self.indexed])

    def moved(self, value, cur, indexed=()):
        """This probe with ``value`` now, its axes ``cur``; ``indexed`` ones removed."""
        return dataclasses.replace(self, value=value, axes=(*self.head(), *cur),
                                   indexed=(*self.indexed, *indexed))

    def materialize(self):
        if _RECORD:                   # met by something no probe rule reads (clip, w * array)
            _RECORD[-1].formed.add(self.leaf)
        return self.value

    def astype(self, dtype):
        return dataclasses.replace(self, value=self.value.astype(dtype))


class _Record:
    """What the probes saw: ``{leaf: (stack_ndim, in_axes)}`` and which were gathered."""

    def __init__(self, ndims: list[int]):
        self.ndims = ndims
        self.layouts: dict[int, tuple[int, tuple[int, ...]]] = {}
        self.gathered: set[int] = set()
        self.joined: dict[int, set[int]] = {}     # leaf -> leaves concatenated onto it
        self.formed: set[int] = set()

    def note(self, probe: _Probe, contract, batch, *, gather: bool = False) -> None:
        seen, todo = {probe.leaf}, [probe.leaf]
        while todo:
            for other in self.joined.get(todo.pop(), ()):
                if other not in seen:
                    seen.add(other)
                    todo.append(other)
        for leaf in sorted(seen):
            self._note(dataclasses.replace(probe, leaf=leaf), contract, batch, gather)

    def _note(self, probe: _Probe, contract, batch, gather: bool) -> None:
        cur = probe.current()
        stack = sorted(_flat([*probe.stacked(), *(cur[a] for a in batch)]))
        k = len(stack)
        ins = tuple(sorted(a - k for a in _flat(cur[a] for a in contract) if a not in stack))
        if gather:
            self.gathered.add(probe.leaf)
            self.layouts.pop(probe.leaf, None)
        elif probe.leaf in self.layouts or probe.leaf in self.gathered:
            return
        n_rest = self.ndims[probe.leaf] - k
        if stack != list(range(k)) or not ins or min(ins) < 0 or len(ins) >= n_rest:
            return
        self.layouts[probe.leaf] = (k, ins)


_RECORD: list[_Record] = []


def _bind_dense(eqn, invals):
    """The eqn on the values; a probe's own rules read its use, so it is not ``formed``."""
    return compat.bind(eqn, *[x.value if isinstance(x, _Probe) else dense(x) for x in invals])


@register("dot_general", _Probe)
def _probe_dot(eqn, invals, ctx):
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = invals
    for x, other, c, b in ((lhs, rhs, lc, lb), (rhs, lhs, rc, rb)):
        if isinstance(x, _Probe) and not isinstance(other, _Probe):
            _RECORD[-1].note(x, c, b)
    return _bind_dense(eqn, invals)


@register("conv_general_dilated", _Probe)
def _probe_conv(eqn, invals, ctx):
    w = invals[1]
    if isinstance(w, _Probe) and not isinstance(invals[0], _Probe):
        out_ax = eqn.params["dimension_numbers"].rhs_spec[0]
        _RECORD[-1].note(w, [a for a in range(w.value.ndim) if a != out_ax], [])
    return _bind_dense(eqn, invals)


@register("gather", _Probe)
def _probe_gather(eqn, invals, ctx):
    w, idx = invals
    if not isinstance(w, _Probe) or isinstance(idx, _Probe):
        return _bind_dense(eqn, invals)
    dn, sizes, cur = eqn.params["dimension_numbers"], eqn.params["slice_sizes"], w.current()
    taken = gathered_axes(dn, sizes, w.value.shape)
    if len(cur) - len(taken) >= 2 and whole_slices(eqn, w.value.shape):
        # w[ids] keeping whole matrices (a mixture of experts' per-token weights): the
        # indexed axes become the result's batch axes, to be read off its use.
        out = _bind_dense(eqn, invals)
        kept = iter(() if a in taken else cur[a] for a in range(len(cur))
                    if a not in dn.collapsed_slice_dims)
        batch = tuple(_flat(cur[a] for a in taken))
        return w.moved(out, tuple(next(kept) if d in dn.offset_dims else batch
                                  for d in range(out.ndim)))
    _RECORD[-1].note(w, taken, [], gather=True)                  # rows of a table
    return _bind_dense(eqn, invals)


@register("transpose", _Probe)
def _probe_transpose(eqn, invals, ctx):
    (w,) = invals
    cur, perm = w.current(), eqn.params["permutation"]
    return w.moved(jnp.transpose(w.value, perm), tuple(cur[a] for a in perm))


@register("squeeze", _Probe)
def _probe_squeeze(eqn, invals, ctx):
    (w,) = invals
    cur, dims = w.current(), set(eqn.params["dimensions"])
    return w.moved(jnp.squeeze(w.value, tuple(dims)),
                   tuple(a for i, a in enumerate(cur) if i not in dims),
                   tuple(cur[i] for i in sorted(dims)))


@register("reshape", _Probe)
def _probe_reshape(eqn, invals, ctx):
    w = invals[0]
    if len(invals) != 1 or eqn.params.get("dimensions"):
        return _bind_dense(eqn, invals)
    cur, dropped = _reshape_axes(w.value.shape, w.current(), tuple(eqn.params["new_sizes"]))
    # A vanishing size-1 axis in front of every kept one is a stacked axis taken away (a
    # scanned [1, D, F] used as [D, F]); one among the others (Keras' depthwise [K, K, C, 1]
    # seen as [K, K, 1, C]) is simply gone, on the output side.
    kept = {a for e in cur for a in _flat([e])}
    indexed = tuple(e for e in dropped if all(a < b for a in _flat([e]) for b in kept))
    return w.moved(compat.bind(eqn, w.value), cur, indexed)


def _reshape_axes(old, entries, new):
    """Probe entries of a reshape's result: each new axis gets the parameter axes of the run
    of old axes it was cut from; old size-1 axes that vanish are returned as indexed."""
    if 0 in old or 0 in new:                    # an empty leaf: nothing to read
        return tuple(() for _ in new), ()
    out, dropped, i, j = [], [], 0, 0
    while i < len(old) or j < len(new):
        if j < len(new) and new[j] == 1 and (i == len(old) or old[i] != 1):
            out.append(())
            j += 1
        elif i < len(old) and old[i] == 1 and (j == len(new) or new[j] != 1):
            dropped.append(entries[i])
            i += 1
        else:
            si, sj, pi, pj = i, j, old[i], new[j]
            i, j = i + 1, j + 1
            while pi != pj:
                if pi < pj:
                    pi, i = pi * old[i], i + 1
                else:
                    pj, j = pj * new[j], j + 1
            merged = tuple(_flat(entries[si:i]))
            out += [merged if len(merged) != 1 else merged[0]] * (j - sj)
    return tuple(out), tuple(dropped)


@register("broadcast_in_dim", _Probe)
def _probe_broadcast(eqn, invals, ctx):
    w = invals[0]
    if len(invals) != 1:
        return _bind_dense(eqn, invals)
    where = {d: i for i, d in enumerate(eqn.params["broadcast_dimensions"])}
    cur, shape = w.current(), eqn.params["shape"]
    return w.moved(compat.bind(eqn, w.value),
                   tuple(cur[where[d]] if d in where else () for d in range(len(shape))))


def _probe_same_axes(eqn, invals, ctx):
    """slice / dynamic_slice / split / rev / pad / name / neg / stop_gradient / sharding
    constraints keep every axis."""
    w = invals[0]
    if not isinstance(w, _Probe) or any(isinstance(x, _Probe) for x in invals[1:]):
        return _bind_dense(eqn, invals)
    out = compat.bind(eqn, w.value, *invals[1:])
    if eqn.primitive.multiple_results:
        return [dataclasses.replace(w, value=o) for o in out]
    return dataclasses.replace(w, value=out)


for _name in ("slice", "dynamic_slice", "split", "rev", "pad", "name", "neg", "stop_gradient",
              "sharding_constraint", "reshard"):
    register(_name, _Probe, _probe_same_axes)


@register("concatenate", _Probe)
def _probe_concat(eqn, invals, ctx):
    """Leaves concatenated along one axis with the same axes (a fused QKV built at call
    time) are used alike: the result probes the first, and whatever it meets is noted for
    all of them."""
    probes = [x for x in invals if isinstance(x, _Probe)]
    out = _bind_dense(eqn, invals)
    first = probes[0]
    if any((p.axes, p.indexed, p.value.ndim) != (first.axes, first.indexed, first.value.ndim)
           for p in probes):
        return out
    joined = _RECORD[-1].joined.setdefault(first.leaf, set())
    joined.update(p.leaf for p in probes[1:] if p.leaf != first.leaf)
    return dataclasses.replace(first, value=out)


def _probe_scaled(eqn, invals, ctx):
    """``w * c``, ``c * w``, ``w / c`` with a scalar c keep every axis (muP scales)."""
    w = next((x for x in invals if isinstance(x, _Probe)), None)
    if w is None or scalar_operand(eqn, invals, w) is None:
        return _bind_dense(eqn, invals)
    return dataclasses.replace(w, value=compat.bind(eqn, *[w.value if x is w else x
                                                           for x in invals]))


for _name in ("mul", "div"):
    register(_name, _Probe, _probe_scaled)


def _unused_layout_keys(params, layout, what: str) -> None:
    """A layout entry that names no leaf is a typo that would silently keep the guess."""
    if layout is None or callable(layout):
        return
    paths = [path_str(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(params, is_leaf=is_implicit)[0]]
    for key in layout:
        if key not in paths and not any(re.search(key, p) for p in paths):
            raise ValueError(f"{what}: layout key {key!r} matches no leaf; the tree holds "
                             f"{paths[:6]}. Fix the path or regex, or drop the entry.")


def layouts_for(params, *, layout: LayoutSpec = None, fn=None, args=(), kwargs=None,
                what: str, require_use: bool):
    """``(layout_of(path, leaf), default_target)`` for a transformation of ``params``.

    With ``fn``, layouts come from how ``fn(params, *args, **kwargs)`` uses each leaf
    (an explicit ``layout`` entry matching the path wins), and the default targets are
    the leaves it contracts as weights; a leaf ``fn`` never uses raises (``require_use``)
    or gets the guessed layout. Without ``fn``: ``layout``, a node's own layout, or the
    guess; ``default_target`` is None (the name-based default).
    """
    check_layout_spec(what, layout)
    _unused_layout_keys(params, layout, what)
    if fn is None:
        def layout_of(path, leaf):
            ins = getattr(leaf, "in_axes", None) or getattr(leaf, "in_ndim", None)
            own = (getattr(leaf, "stack_ndim", None), ins)
            if is_implicit(leaf) and None not in own and layout is None:
                return normalize(own, path, leaf.shape)    # a quantized base keeps its layout
            return resolve_layout(layout, path, leaf)
        return layout_of, None
    if not callable(fn):
        raise TypeError(f"{what}: fn must be callable, got {type(fn).__name__}.")
    used, formed = _usage(fn, params, tuple(args), kwargs)

    def explicit(path):
        return layout is not None and (callable(layout) or path in layout
                                       or any(re.search(k, path) for k in layout))

    def layout_of(path, leaf):
        if explicit(path):
            return resolve_layout(layout, path, leaf)
        if path in used:
            return normalize(used[path][0], path, leaf.shape)
        if require_use:
            how = ("uses leaf {!r} (shape {}) only through operations whose effect on its axes "
                   "is not read (an elementwise op with another array, a clip, a reduction, "
                   "...), never contracting it with an input directly"
                   if path in formed else
                   "never contracts leaf {!r} (shape {}) with an input")
            raise ValueError(
                f"{what}: fn {how.format(path, tuple(leaf.shape))}, so it has no input/output "
                "axes. Exclude it from targets, or pass layout= for it.")
        return resolve_layout(layout, path, leaf)

    def default(path, leaf):
        # not embedding tables (only gathered)
        return (path in used and used[path][1] == "weight" and is_float_array(leaf)
                and len(leaf.shape) >= 2)
    layout_of.gathered = frozenset(p for p, (_, kind) in used.items() if kind == "table")
    return layout_of, default


def infer_layout(fn, params, *args, **kwargs) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``{path: (stack_ndim, in_axes)}`` for every ``params`` leaf that ``fn`` contracts.

    ``fn(params, *args, **kwargs)`` is traced abstractly (no FLOPs). A leaf used
    in a ``dot_general`` or convolution against an activation gets the axes
    that use contracts; a leaf gathered by rows (an embedding) gets its row axis
    as input. Leaves never contracted, or contracted with stacked axes that are
    not leading, are left out. Pass the result as ``lorafy(..., layout=...)``.
    """
    return {path: lay for path, (lay, _) in weight_usage(fn, params, args, kwargs).items()}


def weight_usage(fn, params, args=(), kwargs=None) -> dict[str, tuple[tuple[int, tuple], str]]:
    """``{path: (layout, kind)}``: :func:`infer_layout` plus how the leaf is used: ``"weight"``
    (contracted) or ``"table"`` (gathered by rows: an embedding)."""
    return _usage(fn, params, args, kwargs)[0]


def _usage(fn, params, args, kwargs) -> tuple[dict, frozenset]:
    """:func:`weight_usage`, and the paths fn uses only in ways no probe rule reads."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_implicit)
    paths = [path_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    shaped = [i for i, x in enumerate(leaves) if hasattr(x, "shape") and hasattr(x, "dtype")]

    def run(*values):
        full = list(leaves)
        for i, v in zip(shaped, values):
            full[i] = _Probe(jnp.zeros(v.shape, v.dtype), leaf=i, axes=tuple(range(len(v.shape))))
        return interpret(fn)(jax.tree.unflatten(treedef, full), *args, **(kwargs or {}))

    record = _Record([len(x.shape) if i in shaped else 0 for i, x in enumerate(leaves)])
    _RECORD.append(record)
    try:
        jax.eval_shape(run, *[jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype)
                              for i in shaped])
    finally:
        _RECORD.pop()
    used = {paths[i]: (lay, "table" if i in record.gathered else "weight")
            for i, lay in record.layouts.items()}
    return used, frozenset(paths[i] for i in record.formed - set(record.layouts))
