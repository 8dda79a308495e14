"""Which axes of a weight are stacked layers, inputs and outputs.

A layout is ``(stack_ndim, in_axes)``: the leading ``stack_ndim`` axes are
stacked layers (``nn.scan``, ``hk.layer_stack``, ``nnx.vmap``), and ``in_axes``
are the positions, among the remaining axes, of the axes the function
contracts with its input (in any order and position); the rest are outputs.

The right layout is read off how a function uses the weight
(:func:`lora_jax.infer_layout`, or ``lorafy(..., fn=, args=)``). Without a
function, :func:`default_layout` guesses from the path and shape: that cannot
tell a scanned Dense ``(L, d, f)`` from a DenseGeneral ``(d, heads, hd)``, and
``lora(fn)`` says so when the guess disagrees with the use.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Union

from lora_jax.core import checks, leaf_name

Layout = tuple[int, tuple[int, ...]]   # (stack_ndim, in_axes)
LayoutSpec = Union[None, Callable[[str, Any], Any], Mapping[str, Any]]

_MHA_IN = re.compile(r"(^|/)(query|key|value)$")
_MHA_OUT = re.compile(r"(^|/)(out|attention_output)$")      # Flax / Keras


def _module(path: str) -> str:
    """The path without the leaf name (and NNX's ``value`` wrapper)."""
    parts = path.split("/")
    if len(parts) > 1 and parts[-1] in ("value", "raw_value"):
        parts = parts[:-1]
    return "/".join(parts[:-1])


def default_layout(path: str, shape: tuple[int, ...]) -> Layout:
    """The layout the common frameworks' own modules give a weight of ``shape``.

    * a conv module's weight (``conv`` in its name, or inside a ``patch...`` module such
      as ViT's ``patch_embeddings/projection``): HWIO ``kernel``/``w`` has the
      spatial and in-feature axes as inputs (haiku's transposed convs keep ``w`` as
      [*K, O, I]); OIHW ``weight`` (Equinox, PyTorch) everything but axis 0.
    * Flax ``MultiHeadDotProductAttention`` (and Keras' ``MultiHeadAttention``):
      ``query|key|value`` (d, h, hd) contract axis 0, ``out`` (Keras:
      ``attention_output``) (h, hd, d) axes 0 and 1. One extra leading axis = stacked.
    * ``weight``, ``weight_ih``/``weight_hh`` (PyTorch / Equinox convention): an
      ``(out, in)`` matrix.
    * anything else (``kernel``, ``w``, haiku GRU's ``w_i``/``w_h``): an ``(in, out)`` matrix.
    Extra leading axes of a matrix are stacked layers.
    """
    nd = len(shape)
    name, module = leaf_name(path), _module(path)
    last = module.rsplit("/", 1)[-1].lower()
    patchify = any(part.lower().startswith("patch") for part in module.split("/"))
    if ("conv" in last or patchify) and nd >= 3:
        if name == "weight":
            return 0, tuple(range(1, nd))
        if name == "w" and "transpose" in last:        # haiku ConvNDTranspose: [*K, O, I]
            return 0, (*range(nd - 2), nd - 1)
        return 0, tuple(range(nd - 1))
    if _MHA_IN.search(module):
        return (nd - 3 if nd >= 3 else 0), (0,)
    if _MHA_OUT.search(module):
        return (nd - 3, (0, 1)) if nd >= 3 else (0, (0,))
    return max(nd - 2, 0), ((1,) if name.startswith("weight") else (0,))


def normalize(layout, path: str, shape: tuple[int, ...]) -> Layout:
    """``(stack_ndim, in_axes)`` from a layout value; ``(s, k: int)`` means in_axes
    ``(0, ..., k-1)``. Raises ValueError naming the leaf when it cannot apply."""
    try:
        s, ins = layout
        s = int(s)
        ins = tuple(range(int(ins))) if isinstance(ins, (int,)) else tuple(int(i) for i in ins)
    except (TypeError, ValueError):
        raise ValueError(f"layout for leaf {path!r} is {layout!r}; expected (stack_ndim, in_axes) "
                         "such as (0, (0,)), or (stack_ndim, in_ndim).") from None
    n = len(shape) - s
    if s < 0 or not ins or len(set(ins)) != len(ins) or any(not 0 <= i < n for i in ins) \
            or len(ins) >= n:
        raise ValueError(
            f"layout for leaf {path!r} of shape {tuple(shape)} is (stack_ndim={s}, in_axes={ins}); "
            "it needs stack_ndim >= 0, distinct input axes among the non-stacked ones and at "
            "least one output axis. Pass layout={regex: (stack_ndim, in_axes)}, or "
            "lorafy(..., fn=, args=) to read it off the function.")
    return s, ins


def check_layout_spec(what: str, layout) -> None:
    """TypeError/ValueError naming ``layout`` unless it is None, a callable or a
    ``{regex or path: layout}`` mapping with valid regex keys."""
    if layout is None or callable(layout):
        return
    if not isinstance(layout, Mapping):
        raise TypeError(f"{what}: layout must be None, a dict {{regex or path: (stack_ndim, "
                        f"in_axes)}} or a callable(path, leaf), got {type(layout).__name__} "
                        f"{layout!r}.")
    for key in layout:
        checks.regex(what, "layout key", key)


def resolve_layout(layout: LayoutSpec, path: str, leaf) -> Layout:
    """The layout of leaf ``path``: from ``layout`` (exact path, first matching regex,
    or ``callable(path, leaf)``), else :func:`default_layout`."""
    check_layout_spec("resolve_layout", layout)
    shape = tuple(leaf.shape)
    out = None
    if callable(layout):
        out = layout(path, leaf)
    elif layout is not None:
        if path in layout:                       # exact paths, as infer_layout returns them
            out = layout[path]
        else:
            out = next((lay for rx, lay in layout.items() if re.search(rx, path)), None)
    if out is None:
        out = default_layout(path, shape)
    return normalize(out, path, shape)
