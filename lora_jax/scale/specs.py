"""Partition specs of LoRA and quantized nodes, derived from the base weight's spec.

Start from the specs of the *base* (un-lorafied, un-quantized) parameters --
your own, :func:`~lora_jax.scale.fsdp_specs`' heuristic, or Flax logical-axis
annotations through :func:`~lora_jax.scale.logical_specs` -- and let
:func:`lora_specs` derive the specs of every node leaf. A weight is
``[*S, *layer]``: S stacked-layer axes, then its own axes, the input axes I at
``in_axes`` and the output axes O the rest:

* ``LoraWeight``: ``a [*S, *I, r]`` gets W's spec on S and I with the rank
  replicated, ``b [*S, r, *O]`` W's spec on S and O. So ``x @ A`` contracts over
  the same sharded axes as ``x @ W0`` and ``(xA) @ B`` comes out sharded like
  ``x @ W0``: the adapter adds no collective beyond a tiny all-reduce of the
  rank-r activation.
* ``QuantizedWeight``: S follows the base spec; the per-layer axes are sharded
  so that **no quantization block straddles a shard**.

  - ``nf4``/``fp4`` store each layer as one flat row-major run of the torch
    ``(out, in)`` matrix in blocks of ``block_size``. The flat axis of ``codes``
    and ``scales`` is sharded over the mesh axes the base spec puts on W's
    output axes, then its input axes (the longest such prefix of axes with
    product k such that ``n_layer % (block_size * k) == 0``: every shard holds
    whole blocks); otherwise it is replicated. Double-quant ``nested_scales``
    and ``offset`` are tiny and replicated per layer.
  - ``int4`` stores ``codes [*S, in/2, out]`` and ``scales [*S, in/group, out]``:
    the out axis takes the output-axis mesh axes when divisible, the packed in
    axis the input-axis mesh axes when whole groups land on each shard.

  ``materialize()`` gathers a layer's codes (4-bit data) before dequantizing,
  so the dense weight enters the matmul whole, as an FSDP-sharded weight does.

Example:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> from lora_jax.lora import lorafy
    >>> lp = lorafy({"up": {"kernel": jnp.ones((5, 7))}}, rank=2)
    >>> s = lora_specs(lp, {"up": {"kernel": P("fsdp", "tensor")}})["up"]["kernel"]
    >>> s.w0, s.a, s.b
    (P('fsdp', 'tensor'), P('fsdp', None), P(None, 'tensor'))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lora_jax.core import is_implicit
from lora_jax.lora import LoraWeight
from lora_jax.quant import is_quantized


def is_spec(x) -> bool:
    """A leaf of a spec tree: a PartitionSpec, or None (a hole or 'replicated')."""
    return isinstance(x, P) or x is None


def axes_of(entry) -> tuple[str, ...]:
    """Mesh axis names of one PartitionSpec entry (None, 'x' or ('x', 'y'))."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def entry_of(axes: Sequence[str]):
    """The PartitionSpec entry sharding one array axis over ``axes``."""
    axes = tuple(axes)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def pad_spec(spec, ndim: int) -> tuple:
    spec = tuple(spec) if spec is not None else ()
    if len(spec) > ndim:
        raise ValueError(f"partition spec {spec} has more entries than the array has axes ({ndim})")
    return spec + (None,) * (ndim - len(spec))


def mesh_size(mesh, axes) -> int:
    return math.prod(dict(mesh.shape)[a] for a in axes)


def fit(mesh, axes: Sequence[str], ok) -> tuple[str, ...]:
    """Longest prefix of ``axes`` whose mesh size k satisfies ``ok(k)`` (() without a mesh)."""
    axes = tuple(axes)
    for n in range(len(axes), 0, -1):
        if mesh is not None and ok(mesh_size(mesh, axes[:n])):
            return axes[:n]
    return ()


def split_spec(spec, ndim: int, stack: int, in_axes) -> tuple[tuple, tuple, tuple]:
    """A weight's spec as (S entries, I entries in ``in_axes`` order, O entries)."""
    full = pad_spec(spec, ndim)
    layer = full[stack:]
    outs = [j for j in range(len(layer)) if j not in in_axes]
    return full[:stack], tuple(layer[j] for j in in_axes), tuple(layer[j] for j in outs)


def _quant_specs(q, s_spec, i_spec, o_spec, mesh):
    """Specs for the leaves of a QuantizedWeight given the base spec split in S/I/O."""
    s = tuple(s_spec)
    i_axes = tuple(a for e in i_spec for a in axes_of(e))
    o_axes = tuple(a for e in o_spec for a in axes_of(e))
    if q.kind == "int4":
        out_ax = fit(mesh, o_axes, lambda k: q.out_features % k == 0)
        in_ax = fit(mesh, i_axes, lambda k: (q.padded_in // q.group_size) % k == 0
                    and q.group_size % 2 == 0)
        per_layer = (entry_of(a for a in in_ax if a not in out_ax), entry_of(out_ax))
    else:
        # Output axes lead the flat (out, in) run; then input axes.
        cand = o_axes + tuple(a for a in i_axes if a not in o_axes)
        per_layer = (entry_of(fit(mesh, cand, lambda k: q.layer_size % (q.block_size * k) == 0)),)

    def leaf(x, rest):
        return None if x is None else P(*s, *rest)
    return dataclasses.replace(
        q, codes=leaf(q.codes, per_layer), scales=leaf(q.scales, per_layer),
        nested_scales=leaf(q.nested_scales, (None,)), offset=leaf(q.offset, ()))


def _lora_stack_ndim(node: LoraWeight):
    """Stacked axes of a LoraWeight that may be a ``split`` half (None: cannot tell)."""
    if node.a is not None:
        return node.stack_ndim
    if is_quantized(node.w0):
        return node.w0.stack_ndim
    if node.b is not None:
        raise ValueError("cannot tell the stacked axes of a LoraWeight with a=None and "
                         "b given; keep A and B together (split() does)")
    return None


def _lora_node_specs(node: LoraWeight, spec, mesh):
    w0, a, b = node.w0, node.a, node.b
    stack = _lora_stack_ndim(node)
    if stack is None:                     # frozen half with a plain w0: only w0 needs a spec
        return dataclasses.replace(node, w0=P(*pad_spec(spec, len(w0.shape))))
    ndim = len(w0.shape) if w0 is not None else stack + node.in_ndim + (b.ndim - stack - 1)
    s_spec, i_spec, o_spec = split_spec(spec, ndim, stack, node.in_axes)
    if w0 is None:
        w0s = None
    elif is_quantized(w0):
        w0s = _quant_specs(w0, s_spec, i_spec, o_spec, mesh)
    elif is_implicit(w0):
        raise TypeError(f"no sharding rule for a {type(w0).__name__} inside a LoraWeight")
    else:
        w0s = P(*pad_spec(spec, ndim))
    return dataclasses.replace(node, w0=w0s,
                               a=None if a is None else P(*s_spec, *i_spec, None),
                               b=None if b is None else P(*s_spec, None, *o_spec))


def _node_specs(node, spec, mesh):
    if isinstance(node, LoraWeight):
        return _lora_node_specs(node, spec, mesh)
    if is_quantized(node):
        parts = split_spec(spec, len(node.shape), node.stack_ndim, node.in_axes)
        return _quant_specs(node, *parts, mesh)
    raise TypeError(f"no sharding rule for a {type(node).__name__}")


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
        if is_implicit(x):
            return _node_specs(x, spec, mesh)
        if spec is None:
            return P()
        pad_spec(spec, len(getattr(x, "shape", ())))
        return spec

    return jax.tree.map(one, base_specs, params, is_leaf=is_spec)
