"""Base partition specs: an FSDP (+ tensor-parallel) heuristic, or Flax logical axes.

Both return specs of the *base* weights (one spec per array or node, by its
logical shape); :func:`~lora_jax.scale.lora_specs` turns them into specs of a
lorafied / quantized tree.

The heuristic depends on the mesh's axis types:

* **auto axes** (the partitioner picks every intermediate sharding): Megatron
  column/row tensor parallelism on ``tensor_axis``, then FSDP on the largest
  remaining divisible axis over ``fsdp_axis``.
* **explicit axes** (``jax.make_mesh``'s default since JAX 0.9: shardings are
  part of the types, and an op whose output sharding is ambiguous is an error):
  a weight is sharded over ``(fsdp_axis, tensor_axis)`` on one of its *input*
  (contracted) axes only. An activation sharded over the batch then meets a
  weight sharded on the axis the matmul contracts, which JAX resolves by
  gathering the weight (FSDP), and no activation is ever sharded on a feature
  axis, so a model that names no ``out_sharding`` trains with these specs.
  Sharding an output axis would put the batch's mesh axis on two axes of the
  result, and row-parallel tensor parallelism contracts two sharded axes; both
  need the model to say how its outputs are sharded, which a spec cannot. Pass
  your own base specs for that.

Stacked (``nn.scan``) axes are never sharded: ``lax.scan`` slices one layer per
iteration and a layer axis split over devices would make every iteration gather
from a remote device. Users may still shard them in their own base specs.

Example (an abstract mesh: no devices needed):
    >>> import jax.numpy as jnp
    >>> from jax.sharding import AbstractMesh, AxisType
    >>> params = {"up_proj": {"kernel": jnp.ones((64, 96))}, "bias": jnp.ones(96)}
    >>> for kind in (AxisType.Auto, AxisType.Explicit):
    ...     mesh = AbstractMesh((2, 4), ("fsdp", "tensor"), axis_types=(kind,) * 2)
    ...     s = fsdp_specs(params, mesh, min_size=64)
    ...     print(kind.name, s["up_proj"]["kernel"], s["bias"])
    Auto P('fsdp', 'tensor') P('fsdp',)
    Explicit P(('fsdp', 'tensor'), None) P()
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lora_jax.core import compat, is_default_target, is_implicit, path_str
from lora_jax.lora import LayoutSpec, resolve_layout
from lora_jax.scale.specs import entry_of, lora_specs

# Column-parallel (tensor on the output axis) and row-parallel (tensor on the input axis).
_TENSOR_OUT = re.compile(r"(^|/)(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|wi|"
                         r"wi_0|wi_1|fc1|c_fc)(/|$)")
_TENSOR_IN = re.compile(r"(^|/)(o_proj|down_proj|out|wo|fc2|c_proj)(/|$)")


def is_explicit(mesh) -> bool:
    """Whether every axis of ``mesh`` is explicit (JAX's ``make_mesh`` default)."""
    explicit = compat.explicit_axes(mesh)
    return bool(explicit) and all(explicit)


def _layout(x, path: str, layout: LayoutSpec):
    """(stack_ndim, in_axes) of a weight; a node keeps its own."""
    if is_implicit(x) and hasattr(x, "in_axes"):
        return x.stack_ndim, tuple(x.in_axes)
    try:
        return resolve_layout(layout, path, x)
    except ValueError:
        return 0, (0,)


def _largest(shape, axes, k: int):
    """The largest of ``axes`` (ties: the first) whose length ``k`` divides, or None."""
    cands = [i for i in axes if shape[i] % k == 0]
    return max(cands, key=lambda i: (shape[i], -i)) if cands else None


def _auto_spec(shape, stack, in_axes, path, sizes, axes, rules) -> list:
    """Megatron tensor parallelism on matching paths, then FSDP on the largest free axis."""
    fsdp_axis, tensor_axis = axes
    spec: list = [None] * len(shape)
    free = list(range(stack, len(shape)))
    t = sizes.get(tensor_axis, 1)
    if t > 1 and len(shape) >= 2:
        ins = [stack + j for j in in_axes]
        outs = [i for i in free if i not in ins]
        ax = outs[0] if rules[0].search(path) else ins[0] if rules[1].search(path) else None
        if ax is not None and shape[ax] % t == 0:
            spec[ax] = tensor_axis
            free.remove(ax)
    f = sizes.get(fsdp_axis, 1)
    best = _largest(shape, free, f) if f > 1 else None
    if best is not None:
        spec[best] = fsdp_axis
    return spec


def _explicit_spec(shape, stack, in_axes, sizes, axes) -> list:
    """(fsdp, tensor) -- or the first of them that divides -- on the largest input axis."""
    spec: list = [None] * len(shape)
    if len(shape) < 2:
        return spec
    group = [a for a in axes if sizes.get(a, 1) > 1]
    ins = [stack + j for j in in_axes]
    for use in ([group] if len(group) < 2 else [group, group[:1], group[1:]]):
        best = _largest(shape, ins, math.prod(sizes[a] for a in use)) if use else None
        if best is not None:
            spec[best] = entry_of(use)
            break
    return spec


def fsdp_specs(params, mesh: Mesh, *, fsdp_axis: str = "fsdp", tensor_axis: str = "tensor",
               min_size: int = 4096, layout: LayoutSpec = None,
               tensor_out: str | re.Pattern = _TENSOR_OUT,
               tensor_in: str | re.Pattern = _TENSOR_IN):
    """A default FSDP (+ tensor-parallel) PartitionSpec for every leaf of ``params``.

    Per leaf with at least ``min_size`` elements, stacked axes left alone:

    * auto axes: kernels whose path matches ``tensor_out`` (q/k/v/gate/up projections)
      shard their first output axis over ``tensor_axis``, ``tensor_in`` (o/down) their
      first input axis -- Megatron's column/row split, when divisible; then the largest
      remaining axis divisible by the ``fsdp_axis`` size is sharded over it.
    * explicit axes: weights (nodes, and the leaves ``lorafy`` targets by default) shard
      the largest input axis divisible by the ``fsdp_axis`` x ``tensor_axis`` size over
      both (else over the one that divides); output axes and other leaves (biases,
      norms, embedding tables) are never sharded (see the module docstring).

    Smaller leaves (norms, biases) are replicated. Mesh axes missing from ``mesh`` or of
    size 1 are skipped, so the same call serves ``(data, fsdp, tensor)`` meshes of any
    shape. ``layout`` gives the input axes of plain arrays (default: the path convention).
    """
    sizes = dict(mesh.shape)
    rules = tuple(re.compile(r) if isinstance(r, str) else r for r in (tensor_out, tensor_in))
    explicit = is_explicit(mesh)

    def one(path, x):
        if x is None:
            return None
        shape = tuple(x.shape)
        if len(shape) == 0 or math.prod(shape) < min_size:
            return P()
        p = path_str(path)
        stack, in_axes = _layout(x, p, layout) if len(shape) >= 2 else (0, (0,))
        if explicit:
            if not (is_implicit(x) or is_default_target(p, x)):
                return P()                         # biases, norms, embedding tables
            return P(*_explicit_spec(shape, stack, in_axes, sizes, (fsdp_axis, tensor_axis)))
        return P(*_auto_spec(shape, stack, in_axes, p, sizes, (fsdp_axis, tensor_axis), rules))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_implicit)


def logical_specs(variables, rules: Sequence[tuple[str, Any]]):
    """Base specs from Flax logical-axis annotations (``nn.with_logical_partitioning``).

    ``variables`` is the (abstract) output of ``model.init`` still holding
    ``nn.LogicallyPartitioned`` boxes, e.g. ``jax.eval_shape(model.init, key, x)["params"]``;
    ``rules`` maps logical names to mesh axes, e.g. ``[("embed", "fsdp"), ("mlp", "tensor")]``.
    Unboxed leaves (no annotation) get ``P()``. Feed the result to :func:`lora_specs`
    together with the lorafied tree built from ``nn.meta.unbox(variables)``.

    ``variables`` may also be ``lorafy`` (or ``quantize``) of the boxed tree: a box then holds
    a node, and the result is already :func:`lora_specs` of ``nn.meta.unbox(variables)`` (the
    box's spec is the weight's, which A and B divide between them).
    """
    import flax.linen as nn

    base = nn.logical_to_mesh(nn.get_partition_spec(variables), rules)
    unboxed = nn.meta.unbox(variables)
    if any(map(is_implicit, jax.tree.leaves(unboxed, is_leaf=is_implicit))):
        return lora_specs(unboxed, base)
    return base
