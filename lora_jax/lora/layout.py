"""Which axes of a kernel are stacked layers, inputs and outputs.

Flax stores every kernel as ``[*S, *I, *O]``: S are leading axes added by
``nn.scan``/``nn.vmap``, I the axes contracted with the input, O the output
axes. The split cannot be read off a shape — (L, d, f) from a scanned Dense and
(d, heads, head_dim) from a DenseGeneral look alike — so it comes from the key
path, and users with other conventions pass ``layout=``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Union

from lora_jax.core.tree import path_str

Layout = tuple[int, int]  # (stack_ndim, in_ndim)
LayoutSpec = Union[None, Callable[[str, Any], Layout], Mapping[str, Layout]]

_CONV = re.compile(r"(^|/)[^/]*conv[^/]*/kernel$", re.IGNORECASE)
_MHA_IN = re.compile(r"(^|/)(query|key|value)/kernel$")
_MHA_OUT = re.compile(r"(^|/)out/kernel$")


def default_layout(path: str, shape: tuple[int, ...]) -> Layout:
    """The (stack_ndim, in_ndim) Flax's own modules give a kernel of ``shape``.

    * ``.../*conv*/kernel`` (HWIO, any spatial rank): I = spatial + in-features.
    * ``query|key|value/kernel`` of MultiHeadDotProductAttention: (d, h, hd), I = 1;
      ``out/kernel``: (h, hd, d), I = 2. One extra leading axis = stacked.
    * anything else: a 2-D (in, out) matrix; extra leading axes are stacked layers.
    """
    nd = len(shape)
    if _CONV.search(path):
        return 0, nd - 1
    if _MHA_IN.search(path):
        return nd - 3 if nd >= 3 else 0, 1
    if _MHA_OUT.search(path):
        return (nd - 3, 2) if nd >= 3 else (0, 1)
    return max(nd - 2, 0), 1


def resolve_layout(layout: LayoutSpec, path: str, leaf) -> Layout:
    shape = tuple(leaf.shape)
    if layout is None:
        out = default_layout(path, shape)
    elif callable(layout):
        out = layout(path, leaf)
        if out is None:
            out = default_layout(path, shape)
    elif path in layout:                       # exact paths, as infer_layout returns them
        out = layout[path]
    else:
        out = None
        for pattern, lay in layout.items():
            if re.search(pattern, path):
                out = lay
                break
        if out is None:
            out = default_layout(path, shape)
    s, i = (int(v) for v in out)
    if s < 0 or i < 1 or s + i >= len(shape):
        raise ValueError(
            f"layout for leaf {path!r} of shape {shape} is (stack_ndim={s}, in_ndim={i}); "
            "it needs stack_ndim >= 0, in_ndim >= 1 and at least one output axis. "
            "Pass layout={regex: (stack_ndim, in_ndim)} or a callable(path, leaf).")
    return s, i
