"""The tree API: quantize a parameter tree (or one array), dequantize it, count its bits.

``quantize(params, "nf4")`` replaces the targeted weights by
:class:`~lora_jax.quant.node.QuantizedWeight` nodes. Leaves are picked by the
same rule as ``lorafy`` (:func:`lora_jax.core.targets.select_leaves`), and each
weight's layout (stacked axes, input axes) comes from ``layout=``, from the
function that uses the tree (``fn=``, ``args=``), or from the path convention.
``bits_per_param`` counts real storage (``jnp.int4`` would take a byte per value
on CPU, so codes are always packed into ``uint8``).

Example:
    >>> import jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((64, 7)), "bias": jnp.zeros(7)}}
    >>> q = quantize(params, "nf4")
    >>> is_quantized(q["dense"]["kernel"]), is_quantized(q["dense"]["bias"])
    (True, False)
    >>> round(bits_per_param(q)["bits_per_param"], 3)   # (224 + 7 + 4 + 4) bytes * 8 / 448
    4.268
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core import Targets, checks, is_float_array, is_implicit, path_str, select_leaves
from lora_jax.lora import LayoutSpec, layouts_for, normalize_layout
from lora_jax.quant import kernels
from lora_jax.quant.codes import KINDS
from lora_jax.quant.node import QuantizedWeight, nbytes


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def check_kind(kind, block_size, group_size, what: str = "quantize") -> None:
    """ValueError naming the fix when ``kind`` / its block or group size is unsupported."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"{what}: unknown quantization kind {kind!r}; use one of {KINDS}")
    if isinstance(block_size, bool) or isinstance(group_size, bool):
        raise TypeError(f"{what}: block_size={block_size!r} / group_size={group_size!r}: sizes "
                        "are ints, not bools")
    if kind in ("nf4", "fp4"):
        if (not isinstance(block_size, (int, np.integer)) or block_size < 32 or block_size > 4096
                or block_size & (block_size - 1)):
            raise ValueError(
                f"{what}: block_size={block_size!r} is invalid for {kind}: use a power of two "
                "in 32..4096 (bitsandbytes supports 32, 64, ..., 4096; QLoRA uses 64)")
    elif not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"{what}: group_size={group_size!r} is invalid for int4: use an int >= 1 "
                         "(default 128, clamped to the in dimension)")


def _check_leaf(path: str, leaf) -> None:
    if not checks.is_array_like(leaf):
        raise TypeError(f"quantize: leaf {path!r} is a {type(leaf).__name__}, not an array; "
                        "narrow `targets` so it does not match this leaf.")
    if not is_float_array(leaf):
        raise ValueError(f"quantize: leaf {path!r} has dtype {leaf.dtype}; only float leaves "
                         "can be quantized. Narrow `targets` so it does not match this leaf.")
    if leaf.ndim < 2:
        raise ValueError(f"quantize: leaf {path!r} of shape {tuple(leaf.shape)} is not a kernel "
                         "(ndim < 2); biases, norms and other 1-D leaves are not quantized. "
                         "Narrow `targets`.")
    if math.prod(leaf.shape) == 0:
        raise ValueError(f"quantize: leaf {path!r} of shape {tuple(leaf.shape)} is empty; "
                         "exclude it from `targets`.")
    # Under jit the values are tracers and cannot be read: only concrete leaves are checked.
    checks.finite_array("quantize", path, leaf,
                        "NaN/Inf would corrupt its block scales (a NaN becomes -absmax, one Inf "
                        "turns a double-quantized tensor into NaN). Fix the weights first.")


def _check_opts(double_quant, stack_ndim, in_axes, in_ndim, path) -> None:
    checks.boolean("quantize", "double_quant", double_quant)
    checks.positive_int("quantize", "stack_ndim", stack_ndim, minimum=0)
    if in_ndim is not None:
        checks.positive_int("quantize", "in_ndim", in_ndim)
    if in_axes is not None and not isinstance(in_axes, (int, np.integer, tuple, list)):
        raise TypeError(f"quantize: in_axes must be a tuple of ints, got {in_axes!r}.")
    if not isinstance(path, str):
        raise TypeError(f"quantize: path must be a string (used in messages), got {path!r}.")


def quantize_array(w, kind: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
                   group_size: int = 128, stack_ndim: int = 0, in_axes=None,
                   in_ndim: int | None = None, path: str = "<array>") -> QuantizedWeight:
    """Quantize one weight ``[*S, *layer]`` (S = ``stack_ndim`` axes).

    ``in_axes`` are the positions of the input (contracted) axes among the layer
    axes (default ``(0,)``, Flax's ``(in, out)``; ``(1,)`` for an ``(out, in)``
    weight); ``in_ndim=k`` is shorthand for ``in_axes=(0, ..., k-1)``.
    """
    check_kind(kind, block_size, group_size)
    _check_opts(double_quant, stack_ndim, in_axes, in_ndim, path)
    _check_leaf(path, w)
    ins = in_axes if in_axes is not None else (1 if in_ndim is None else int(in_ndim))
    s, ins = normalize_layout((stack_ndim, ins), path, tuple(w.shape))
    shape = tuple(w.shape)
    outs = tuple(j for j in range(len(shape) - s) if j not in ins)
    k = math.prod(shape[s + j] for j in ins)
    m = jnp.transpose(jnp.asarray(w), (*range(s), *(s + j for j in (*ins, *outs))))
    m = m.reshape(shape[:s] + (k, -1))
    common = dict(layer_shape=shape[s:], in_axes=ins, dtype=np.dtype(w.dtype))
    if kind == "int4":
        g = min(int(group_size), k)
        codes, scales = kernels.quantize_int4(m, group_size=g)
        return QuantizedWeight(codes=codes, scales=scales, kind="int4", block_size=0,
                               group_size=g, padded_in=-(-k // g) * g, **common)
    codes, sc, nested, offset = kernels.quantize_4bit(
        m, kind=kind, block_size=int(block_size), double_quant=bool(double_quant))
    return QuantizedWeight(codes=codes, scales=sc, nested_scales=nested, offset=offset,
                           kind=kind, block_size=int(block_size), **common)


def quantize(params, kind: str = "nf4", *, block_size: int = 64, double_quant: bool = True,
             targets: Targets = None, layout: LayoutSpec = None, group_size: int = 128,
             fn: Callable | None = None, args: tuple = (), kwargs: Mapping[str, Any] | None = None):
    """Return ``params`` with targeted float weights replaced by :class:`QuantizedWeight`.

    Pure: the input tree is not modified. ``targets`` picks leaves exactly as
    ``lorafy``'s does (default: with ``fn``, the leaves it contracts as weights;
    without, floating ``kernel``/``weight``/``w`` leaves with ndim >= 2; else a
    regex, a list of them, or ``predicate(path, leaf)``). ``layout`` gives
    ``(stack_ndim, in_axes)`` per leaf (see :mod:`lora_jax.lora.layout`); with
    ``fn`` (called as ``fn(params, *args, **kwargs)``, traced abstractly) the
    layouts are read off how it uses each weight. An adapter node (``LoraWeight``)
    has its ``w0`` quantized with its own layout; existing ``QuantizedWeight``
    nodes of the same kind are left as they are (another kind raises).

    A weight holding NaN or Inf raises ``ValueError`` naming its path. The check
    reads values, so it runs only on concrete arrays: under ``jit`` (traced
    leaves) it cannot run, and non-finite weights quantize to garbage there.
    """
    checks.tree("quantize", "params", params)
    check_kind(kind, block_size, group_size)
    checks.boolean("quantize", "double_quant", double_quant)
    checks.callable_or_none("quantize", "fn", fn)
    checks.fn_args("quantize", fn, args, kwargs)
    # A leaf fn never contracts keeps the guessed layout: any layout dequantizes exactly.
    layout_of, default = layouts_for(params, layout=layout, fn=fn, args=args, kwargs=kwargs,
                                     what="quantize", require_use=False)
    chosen = select_leaves(params, targets, what="quantize", default=default)
    opts = dict(block_size=block_size, double_quant=double_quant, group_size=group_size)
    replace = {}
    for path, _, leaf in chosen:
        adapter = is_implicit(leaf) and hasattr(leaf, "w0")
        base = leaf.w0 if adapter else leaf
        if isinstance(base, QuantizedWeight) and base.kind != kind:
            raise ValueError(f"quantize: leaf {path!r} is already quantized as {base.kind}, not "
                             f"{kind}; dequantize() it first to requantize.")
        if is_implicit(base):
            continue                                   # already quantized
        _check_leaf(path, base)
        s, ins = (leaf.stack_ndim, leaf.in_axes) if adapter else layout_of(path, base)
        q = quantize_array(base, kind, stack_ndim=s, in_axes=ins, path=path, **opts)
        replace[path] = dataclasses.replace(leaf, w0=q) if adapter else q
    return jax.tree_util.tree_map_with_path(
        lambda kp, leaf: replace.get(path_str(kp), leaf), params, is_leaf=is_implicit)


def dequantize(tree):
    """Replace every QuantizedWeight (also an adapter node's ``w0``) by its dense array."""
    checks.tree("dequantize", "tree", tree)
    def visit(x):
        if isinstance(x, QuantizedWeight):
            return x.materialize()
        if is_implicit(x) and isinstance(getattr(x, "w0", None), QuantizedWeight):
            return dataclasses.replace(x, w0=x.w0.materialize())
        return x
    return jax.tree_util.tree_map(visit, tree, is_leaf=is_implicit)


def _quantized_leaves(tree):
    """Every QuantizedWeight of ``tree`` (inside other nodes too), and every other array."""
    quantized, plain = [], []
    for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_implicit):
        if isinstance(leaf, QuantizedWeight):
            quantized.append(leaf)
        elif is_implicit(leaf):
            q, p = _quantized_leaves(jax.tree_util.tree_leaves(leaf, is_leaf=is_quantized))
            quantized += q
            plain += p
        elif leaf is not None and hasattr(leaf, "shape"):
            plain.append(leaf)
    return quantized, plain


def bits_per_param(tree) -> dict:
    """Storage of quantized weights in bits per quantized parameter.

    Counts every array leaf of the QuantizedWeight nodes (packed codes, scales,
    double-quant state); the shared code tables are constants and not counted.
    Returns ``{"bits_per_param", "quantized_params", "quantized_bytes",
    "by_kind": {kind: {...}}, "unquantized_leaves", "unquantized_params",
    "unquantized_bytes"}``.
    """
    checks.tree("bits_per_param", "tree", tree)
    quantized, plain = _quantized_leaves(tree)
    by_kind: dict[str, dict] = {}
    for q in quantized:
        d = by_kind.setdefault(q.kind, {"params": 0, "bytes": 0, "leaves": 0})
        d["params"] += q.size
        d["bytes"] += q.nbytes
        d["leaves"] += 1
    for d in by_kind.values():
        d["bits_per_param"] = 8.0 * d["bytes"] / d["params"] if d["params"] else 0.0
    qp = sum(d["params"] for d in by_kind.values())
    qb = sum(d["bytes"] for d in by_kind.values())
    return {
        "bits_per_param": 8.0 * qb / qp if qp else 0.0,
        "quantized_params": qp,
        "quantized_bytes": qb,
        "by_kind": by_kind,
        "unquantized_leaves": len(plain),
        "unquantized_params": sum(int(math.prod(x.shape)) for x in plain),
        "unquantized_bytes": sum(nbytes(x) for x in plain),
    }
