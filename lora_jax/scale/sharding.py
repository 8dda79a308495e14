"""Partition specs for LoRA / quantized parameter trees, and placing trees on a mesh.

Start from the specs of the *base* (un-lorafied, un-quantized) parameters -- your own,
``fsdp_specs(params, mesh)``'s heuristic, or Flax logical-axis annotations through
``logical_specs`` -- and let :func:`lora_specs` derive the specs of every node leaf:

* ``LoraWeight`` ``[*S, *I, *O]`` with base spec ``(s..., i..., o...)``:
  ``a [*S, *I, r]`` gets ``(s..., i..., None)`` (sharded like W's input axes, rank axis
  replicated), ``b [*S, r, *O]`` gets ``(s..., None, o...)`` (like W's output axes).
  So ``x @ A`` contracts over the same sharded axes as ``x @ W0`` and ``(xA) @ B``
  produces an output sharded like ``x @ W0``'s: the adapter adds no new collectives
  beyond a tiny all-reduce of the rank-r activation.
* ``QuantizedWeight`` (codes and scales, see ``_quant``): the stacked-layer axes S
  follow the base spec. The per-layer axes are sharded so that **no quantization block
  straddles a shard**:

  - ``nf4``/``fp4`` store each layer as one flat row-major run of the torch-oriented
    ``(out, in)`` matrix cut in blocks of ``block_size``. The flat axis of ``codes`` and
    ``scales`` (absmax) is sharded over the mesh axes the base spec puts on W's output
    axes, then its input axes (the longest such prefix of axes with product k such that
    ``n_layer % (block_size * k) == 0``, i.e. every shard holds ``nblocks / k`` whole
    blocks and no partial block exists); otherwise the flat axis is replicated. A
    contiguous shard of the flat run is a range of output rows, so this equals sharding
    the dequantized W along its output axis. Double-quant ``nested_scales`` (one float
    per 256 absmax) and ``offset`` (one per layer) are tiny and always replicated on
    their per-layer axis, so every device holds the second-level scale of each of its
    blocks.
  - ``int4`` stores ``codes [*S, in/2, out]`` and ``scales [*S, in/group, out]``; groups
    run along the input axis within one output column. The out axis takes the base's
    output-axis mesh axes when divisible (always block-safe), the packed in axis takes
    the input-axis mesh axes when the group count divides (whole groups per shard),
    else that axis is replicated.

  With the default ``fsdp_specs`` (which never shards the stacked axis, see below)
  this puts ``total / N`` bytes of each quantized kernel on each of N devices whenever
  the divisibility holds, and replicates (correct, more memory) when it does not.
  Dequantization then produces W sharded along its output rows; XLA inserts whatever
  resharding the matmul wants (the same all-gather FSDP does for plain weights).

Stacked (``nn.scan``) axes are never sharded by ``fsdp_specs``: ``lax.scan`` slices one
layer per iteration and a layer axis split over devices would make every iteration
gather from a remote device. Users may still shard them in their own base specs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lora_jax.lora.layout import LayoutSpec, resolve_layout
from lora_jax.core.tree import path_str
from lora_jax.core.implicit import ImplicitArray
from lora_jax.lora.weight import LoraWeight

try:  # _quant is optional at import time (built concurrently).
    from lora_jax.quant.quantize import QuantizedWeight
except ImportError:  # pragma: no cover
    QuantizedWeight = None  # type: ignore[assignment]

__all__ = [
    "lora_specs",
    "fsdp_specs",
    "logical_specs",
    "shard_params",
    "named_shardings",
    "per_device_bytes",
]


def _is_spec(x) -> bool:
    return isinstance(x, P) or x is None


def _is_q(x) -> bool:
    return QuantizedWeight is not None and isinstance(x, QuantizedWeight)


def _axes(entry) -> tuple[str, ...]:
    """Mesh axis names of one PartitionSpec entry (None, 'x' or ('x', 'y'))."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    return tuple(entry)


def _entry(axes: Sequence[str]):
    axes = tuple(axes)
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _pad(spec, ndim: int) -> tuple:
    spec = tuple(spec) if spec is not None else ()
    if len(spec) > ndim:
        raise ValueError(f"partition spec {spec} has more entries than the array has axes ({ndim})")
    return spec + (None,) * (ndim - len(spec))


def _mesh_size(mesh, axes) -> int:
    if mesh is None:
        return 1
    shape = dict(mesh.shape)
    return math.prod(shape[a] for a in axes)


def _fit(mesh, axes: Sequence[str], ok) -> tuple[str, ...]:
    """Longest prefix of ``axes`` whose mesh size k satisfies ``ok(k)``."""
    axes = tuple(axes)
    for n in range(len(axes), 0, -1):
        if mesh is not None and ok(_mesh_size(mesh, axes[:n])):
            return axes[:n]
    return ()


# ----------------------------------------------------------------------------- node specs


def _quant_specs(q, s_spec, i_spec, o_spec, mesh):
    """Specs for the leaves of a QuantizedWeight given the logical base spec split in S/I/O."""
    s = tuple(s_spec)
    i_axes = tuple(a for e in i_spec for a in _axes(e))
    o_axes = tuple(a for e in o_spec for a in _axes(e))

    def leaf_spec(x, per_layer):
        return None if x is None else P(*s, *per_layer)

    if q.kind == "int4":
        n_out = q.out_features
        n_groups = q.padded_in // q.group_size
        out_ax = _fit(mesh, o_axes, lambda k: n_out % k == 0)
        in_ax = _fit(mesh, i_axes, lambda k: n_groups % k == 0 and q.group_size % 2 == 0)
        in_ax = tuple(a for a in in_ax if a not in out_ax)
        return dataclasses.replace(
            q, codes=leaf_spec(q.codes, (_entry(in_ax), _entry(out_ax))),
            scales=leaf_spec(q.scales, (_entry(in_ax), _entry(out_ax))),
            nested_scales=leaf_spec(q.nested_scales, (None,)) if q.nested_scales is not None else None,
            offset=leaf_spec(q.offset, ()) if q.offset is not None else None)
    n = q.layer_size
    bs = q.block_size
    # Output axes lead the flat (out, in) run; then input axes.
    cand = o_axes + tuple(a for a in i_axes if a not in o_axes)
    flat = _fit(mesh, cand, lambda k: n % (bs * k) == 0)
    return dataclasses.replace(
        q, codes=leaf_spec(q.codes, (_entry(flat),)),
        scales=leaf_spec(q.scales, (_entry(flat),)),
        nested_scales=leaf_spec(q.nested_scales, (None,)),
        offset=leaf_spec(q.offset, ()))


def _split_spec(spec, ndim, stack, n_in):
    full = _pad(spec, ndim)
    return full[:stack], full[stack:stack + n_in], full[stack + n_in:]


def _node_specs(node, spec, mesh):
    if isinstance(node, LoraWeight):
        w0, a, b = node.w0, node.a, node.b
        n_in = node.in_ndim
        # The S/I/O split needs stack_ndim: from A (a.ndim - in_ndim - 1) or a quantized w0.
        if a is not None:
            stack = node.stack_ndim
        elif _is_q(w0):
            stack = w0.stack_ndim
        elif b is not None:
            raise ValueError("cannot tell the stacked axes of a LoraWeight with a=None and "
                             "b given; keep A and B together (split() does)")
        else:
            stack = None
        if w0 is not None:
            ndim = len(w0.shape)
        else:
            ndim = stack + n_in + (b.ndim - stack - 1)
        if stack is None:      # frozen half with a plain w0: only w0 needs a spec
            return dataclasses.replace(node, w0=P(*_pad(spec, ndim)))
        s_spec, i_spec, o_spec = _split_spec(spec, ndim, stack, n_in)
        a_s = None if a is None else P(*s_spec, *i_spec, None)
        b_s = None if b is None else P(*s_spec, None, *o_spec)
        if w0 is None:
            w0s = None
        elif _is_q(w0):
            w0s = _quant_specs(w0, s_spec, i_spec, o_spec, mesh)
        elif isinstance(w0, ImplicitArray):
            raise TypeError(f"no sharding rule for a {type(w0).__name__} inside a LoraWeight")
        else:
            w0s = P(*_pad(spec, ndim))
        return dataclasses.replace(node, w0=w0s, a=a_s, b=b_s)
    if _is_q(node):
        ndim = len(node.shape)
        s_spec, i_spec, o_spec = _split_spec(spec, ndim, node.stack_ndim, node.in_ndim)
        return _quant_specs(node, s_spec, i_spec, o_spec, mesh)
    raise TypeError(f"no sharding rule for a {type(node).__name__}")


def _ndim_of(x) -> int:
    return len(x.shape)


def lora_specs(params, base_specs, mesh: Mesh | None = None):
    """PartitionSpecs for a lorafied and/or quantized tree from the base params' specs.

    Args:
      params: the tree to shard (arrays or ``jax.ShapeDtypeStruct``; may contain
        ``LoraWeight`` / ``QuantizedWeight`` nodes and ``None`` holes from ``split``).
      base_specs: a tree matching the *un-lorafied* params: one ``PartitionSpec`` (or
        ``None`` = replicated) where ``params`` holds a node or an array.
      mesh: needed to check that quantized blocks divide evenly over mesh axes; without
        it the per-layer axes of quantized leaves are replicated (always safe).

    Returns:
      A tree with the structure of ``params`` (nodes included, their array leaves
      replaced by ``PartitionSpec``), usable with :func:`shard_params`, ``split`` and
      :func:`named_shardings`. See the module docstring for the rules.
    """
    def one(spec, x):
        if x is None:
            return None
        if isinstance(x, ImplicitArray):
            return _node_specs(x, spec, mesh)
        if spec is None:
            return P()
        _pad(spec, len(getattr(x, "shape", ())))
        return spec

    return jax.tree.map(one, base_specs, params, is_leaf=_is_spec)


# ----------------------------------------------------------------------------- heuristics

# Column-parallel (tensor on the output axis) and row-parallel (tensor on the input axis).
_TENSOR_OUT = re.compile(r"(^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|wi|"
                         r"wi_0|wi_1|fc1|c_fc)(/|$)")
_TENSOR_IN = re.compile(r"(^|/)(o_proj|down_proj|out|wo|fc2|c_proj)(/|$)")


def fsdp_specs(params, mesh: Mesh, *, fsdp_axis: str = "fsdp", tensor_axis: str = "tensor",
               min_size: int = 4096, layout: LayoutSpec = None,
               tensor_out: str | re.Pattern = _TENSOR_OUT,
               tensor_in: str | re.Pattern = _TENSOR_IN):
    """A default FSDP (+ tensor-parallel) PartitionSpec for every leaf of ``params``.

    Returns *base* specs (one spec per array or node, by its logical shape); pass them
    to :func:`lora_specs` for a lorafied / quantized tree. Per leaf with at least
    ``min_size`` elements:

    * stacked-layer axes (``nn.scan``) stay unsharded;
    * kernels whose path matches ``tensor_out`` (q/k/v/gate/up projections) shard their
      first output axis over ``tensor_axis``; ``tensor_in`` (o/down projections) their
      first input axis -- Megatron's column/row split, when divisible;
    * then the largest remaining axis divisible by the ``fsdp_axis`` size is sharded
      over it.

    Smaller leaves (norms, biases) are replicated. Mesh axes missing from ``mesh`` or of
    size 1 are skipped, so the same call serves ``(data, fsdp, tensor)`` meshes of any shape.
    """
    sizes = dict(mesh.shape)
    t_out = re.compile(tensor_out) if isinstance(tensor_out, str) else tensor_out
    t_in = re.compile(tensor_in) if isinstance(tensor_in, str) else tensor_in

    def one(path, x):
        if x is None:
            return None
        shape = tuple(x.shape)
        if math.prod(shape) < min_size or len(shape) == 0:
            return P()
        spec: list = [None] * len(shape)
        p = path_str(path)
        if len(shape) >= 2:
            if isinstance(x, ImplicitArray) and hasattr(x, "in_ndim"):
                stack = getattr(x, "stack_ndim", len(shape) - 2)
                n_in = x.in_ndim
            else:
                try:
                    stack, n_in = resolve_layout(layout, p, x)
                except ValueError:
                    stack, n_in = 0, 1
        else:
            stack, n_in = 0, 1
        free = list(range(stack, len(shape)))
        t = sizes.get(tensor_axis, 1)
        if t > 1 and len(shape) >= 2:
            ax = None
            if t_out.search(p):
                ax = stack + n_in
            elif t_in.search(p):
                ax = stack
            if ax is not None and shape[ax] % t == 0:
                spec[ax] = tensor_axis
                free.remove(ax)
        f = sizes.get(fsdp_axis, 1)
        if f > 1:
            cands = [i for i in free if shape[i] % f == 0]
            if cands:
                best = max(cands, key=lambda i: (shape[i], -i))
                spec[best] = fsdp_axis
        return P(*spec)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, ImplicitArray))


def logical_specs(variables, rules: Sequence[tuple[str, Any]]):
    """Base specs from Flax logical-axis annotations (``nn.with_logical_partitioning``).

    ``variables`` is the (abstract) output of ``model.init`` still holding
    ``nn.LogicallyPartitioned`` boxes, e.g. ``jax.eval_shape(model.init, key, x)["params"]``;
    ``rules`` maps logical names to mesh axes, e.g. ``[("embed", "fsdp"), ("mlp", "tensor")]``.
    Unboxed leaves (no annotation) get ``P()``. Feed the result to :func:`lora_specs`
    together with the lorafied tree built from ``nn.meta.unbox(variables)``.
    """
    import flax.linen as nn

    logical = nn.get_partition_spec(variables)
    return nn.logical_to_mesh(logical, rules)


# ----------------------------------------------------------------------------- placement


def named_shardings(specs, mesh: Mesh):
    """The spec tree with every PartitionSpec turned into a NamedSharding on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def _place(x, sharding: NamedSharding):
    if x is None:
        return None
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    if jax.process_count() == 1:
        # may_alias=False: always fresh buffers, so a step that donates them never
        # deletes the caller's arrays.
        return jax.device_put(x, sharding, may_alias=False)
    # Multi-controller: every process holds the full (identical) host value; each
    # device takes its slice.
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding, may_alias=False)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def shard_params(params, mesh: Mesh, specs):
    """Place ``params`` on ``mesh`` following ``specs`` (from :func:`lora_specs` / :func:`fsdp_specs`).

    Works for trees with LoraWeight / QuantizedWeight nodes (their array leaves are
    placed one by one), ``None`` holes, and ``jax.ShapeDtypeStruct`` leaves (returned
    with the sharding attached, for ``jit(...).lower``). In a multi-process run every
    process passes the same full host values; each process keeps its addressable shards.
    """
    shardings = named_shardings(specs, mesh)
    return jax.tree.map(lambda s, x: _place(x, s), shardings, params,
                        is_leaf=lambda x: isinstance(x, NamedSharding) or x is None)


def per_device_bytes(tree) -> int:
    """Bytes one device holds for ``tree`` (max over devices; abstract leaves need a sharding)."""
    per: dict = {}
    total = 0
    for x in jax.tree.leaves(tree):
        shape = tuple(x.shape)
        item = np.dtype(x.dtype).itemsize
        sh = getattr(x, "sharding", None)
        if sh is None:
            total += math.prod(shape) * item
            continue
        local = math.prod(sh.shard_shape(shape)) * item
        for d in sh.device_set:
            per[d] = per.get(d, 0) + local
    return total + (max(per.values()) if per else 0)
