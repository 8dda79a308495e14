"""QuantizedWeight: a 4-bit weight as a pytree node whose leaves are codes and scales.

The node stands for a weight ``[*S, *layer_shape]``: S leading stacked-layer
axes, then one layer in the weight's own axis order, whose input (contracted)
axes sit at positions ``in_axes``. Storage sees the layer as the matrix
``[K, N]`` (K = prod of the input axes, N = prod of the rest, each in axis
order), and every array leaf carries S in front, so ``lax.scan``/``vmap``/
indexing along axis 0 yields the node of one layer:

* ``nf4`` / ``fp4`` -- exactly bitsandbytes' ``quantize_4bit`` layout: the
  torch-oriented ``(N, K)`` matrix flattened row-major in blocks of
  ``block_size`` (the last may be partial), a float32 absmax per block,
  ``clamp(x/absmax)`` to the nearest of 16 code values (ties to the lower
  code), two codes per ``uint8`` with the first element in the HIGH nibble.

  - ``codes``  uint8   ``[*S, ceil(K*N/2)]``
  - ``scales`` float32 ``[*S, nblocks]`` (absmax), or with double quant uint8
    ``[*S, nblocks]``: absmax - mean(absmax), 8-bit blockwise (blocks of 256)
    with bitsandbytes' signed dynamic map;
  - ``nested_scales`` float32 ``[*S, ceil(nblocks/256)]`` and ``offset``
    float32 ``[*S]`` (the mean), both ``None`` without double quant.

* ``int4`` -- symmetric, a float32 scale per group of ``group_size`` rows of
  K and per column: ``scale = absmax(group) / 7``, codes in [-7, 7]; K is
  zero-padded to ``padded_in``, codes packed two per byte along K (first row in
  the HIGH nibble, two's complement nibbles).

  - ``codes``  uint8   ``[*S, ceil(padded_in/2), N]``
  - ``scales`` float32 ``[*S, padded_in/group_size, N]``

A Flax ``(in, out)`` kernel (``in_axes=(0,)``) and an Equinox ``(out, in)``
weight (``in_axes=(1,)``) of the same matrix store the same bytes, equal to
bitsandbytes' for the torch ``(out, in)`` weight.

Example:
    >>> import jax.numpy as jnp
    >>> from lora_jax.quant import quantize_array
    >>> q = quantize_array(jnp.ones((7, 5)), "nf4", in_axes=(1,))   # (out, in)
    >>> q.shape, q.in_features, q.out_features, q.codes.shape
    ((7, 5), 5, 7, (18,))
    >>> bool((q.materialize() == 1.0).all())
    True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax.core import ImplicitArray, compat, node, static
from lora_jax.quant import kernels
from lora_jax.quant.codes import NESTED_BLOCK


def nbytes(x) -> int:
    """Storage bytes of an array or ``ShapeDtypeStruct``."""
    return int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize


@node
@dataclasses.dataclass(frozen=True)
class QuantizedWeight(ImplicitArray):
    """A 4-bit quantized weight; see the module docstring for the layout.

    ``layer_shape`` is the logical per-layer shape in the weight's axis order;
    S is read off the leaves, so a node sliced along axis 0 reports the shape of
    one layer. ``in_axes`` are the positions of the input axes in ``layer_shape``
    (``in_ndim`` is their count). ``dtype`` is the dtype ``materialize()``
    returns (``astype`` changes only it). ``nested_code`` is ``None`` for
    bitsandbytes' standard dynamic map, else the 256 float32 values of a
    non-standard one (kept to reproduce a loaded file).
    """

    codes: Any
    scales: Any
    nested_scales: Any = None
    offset: Any = None
    kind: str = static("nf4")
    block_size: int = static(64)
    layer_shape: tuple = static(())
    in_axes: tuple = static((0,))
    dtype: Any = static(np.dtype(np.float32))
    group_size: int = static(0)
    padded_in: int = static(0)
    nested_block_size: int = static(NESTED_BLOCK)
    nested_code: Optional[tuple] = static(None)

    # ---- derived shape info
    @property
    def stack_ndim(self) -> int:
        return self.codes.ndim - (2 if self.kind == "int4" else 1)

    @property
    def stack_shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape[: self.stack_ndim])

    @property
    def shape(self) -> tuple[int, ...]:
        return self.stack_shape + tuple(self.layer_shape)

    @property
    def in_ndim(self) -> int:
        return len(self.in_axes)

    @property
    def out_axes(self) -> tuple[int, ...]:
        """Positions of the output axes in ``layer_shape``, ascending."""
        return tuple(j for j in range(len(self.layer_shape)) if j not in self.in_axes)

    @property
    def double_quant(self) -> bool:
        return self.nested_scales is not None

    @property
    def in_features(self) -> int:
        return math.prod(self.layer_shape[j] for j in self.in_axes)

    @property
    def out_features(self) -> int:
        return math.prod(self.layer_shape[j] for j in self.out_axes)

    @property
    def layer_size(self) -> int:
        return math.prod(self.layer_shape)

    @property
    def nbytes(self) -> int:
        return sum(nbytes(x) for x in (self.codes, self.scales, self.nested_scales, self.offset)
                   if x is not None)

    def astype(self, dtype) -> "QuantizedWeight":
        return dataclasses.replace(self, dtype=np.dtype(jnp.dtype(dtype)))

    def scaled(self, c) -> "QuantizedWeight":
        """``c * self`` for a scalar ``c``, still quantized: every dequantized value is linear
        in the float scales (with double quant, in the nested scales and the offset)."""
        c = jnp.asarray(c, jnp.float32)
        if self.kind == "int4" or self.nested_scales is None:
            return dataclasses.replace(self, scales=self.scales * c)
        return dataclasses.replace(self, nested_scales=self.nested_scales * c,
                                   offset=self.offset * c)

    def __getitem__(self, idx) -> "QuantizedWeight":
        """Index the stacked axes only (``q[3]`` is layer 3), like ``lax.scan`` does."""
        if self.stack_ndim == 0:
            raise IndexError("QuantizedWeight has no stacked axes to index")
        return jax.tree_util.tree_map(lambda x: x[idx], self)

    # ---- dequantization (jnp only; traceable)
    def absmax(self) -> jax.Array:
        """Per-block float32 absmax ``[*S, nblocks]`` (nf4/fp4), undoing double quant."""
        if self.kind == "int4":
            raise ValueError("int4 nodes have per-group scales, not absmax; use .scales")
        if self.nested_scales is None:
            return jnp.asarray(self.scales, jnp.float32)
        return kernels.dequantize_absmax(self.scales, self.nested_scales, self.offset,
                                         self.nested_block_size, self.nested_code)

    def matrix(self) -> jax.Array:
        """The dequantized float32 ``[*S, K, N]`` matrix (input axes flattened first)."""
        if self.kind == "int4":
            return kernels.dequantize_int4(self.codes, self.scales, self.group_size,
                                           self.in_features)
        flat = kernels.dequantize_4bit(self.codes, self.absmax(), self.kind, self.block_size,
                                       self.layer_size)
        n, k = self.out_features, self.in_features
        return jnp.swapaxes(flat.reshape(self.stack_shape + (n, k)), -1, -2)

    def materialize(self) -> jax.Array:
        """The dense ``[*S, *layer_shape]`` array in ``dtype`` (traceable).

        On a mesh, each layer's codes and scales are first gathered (4-bit data,
        the all-gather FSDP does for a plain weight), so dequantizing is local and
        the weight enters the matmul whole, as an FSDP-sharded plain weight does.
        """
        return _materialize_jit(_gather_layers(self))

    def _materialize(self) -> jax.Array:
        s = self.stack_ndim
        ins = [self.layer_shape[j] for j in self.in_axes]
        outs = [self.layer_shape[j] for j in self.out_axes]
        w = self.matrix().astype(self.dtype).reshape(self.stack_shape + (*ins, *outs))
        order = (*self.in_axes, *self.out_axes)
        return jnp.transpose(w, (*range(s), *(s + order.index(j) for j in range(len(order)))))


_materialize_jit = jax.jit(lambda q: q._materialize())


def _layer_gather_sharding(x, stack_ndim: int):
    """The sharding that keeps ``x``'s stacked axes and replicates the rest, or None
    off a mesh. Under explicit axes the stacked axes keep their spec; under auto
    axes they are left to the partitioner."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return None
    rest = (None,) * (x.ndim - stack_ndim)
    if all(compat.explicit_axes(mesh)):
        spec = tuple(sharding.spec) + (None,) * x.ndim
        return NamedSharding(mesh, P(*spec[:stack_ndim], *rest))
    return NamedSharding(mesh, P(*(P.UNCONSTRAINED,) * stack_ndim, *rest))


def _gather_layers(q: QuantizedWeight) -> QuantizedWeight:
    s = q.stack_ndim

    def gather(x):
        if x is None:
            return None
        target = _layer_gather_sharding(x, s)
        if target is None:
            return x
        if all(compat.explicit_axes(target.mesh)):
            return jax.sharding.reshard(x, target)
        return jax.lax.with_sharding_constraint(x, target)

    return dataclasses.replace(q, codes=gather(q.codes), scales=gather(q.scales),
                               nested_scales=gather(q.nested_scales), offset=gather(q.offset))
