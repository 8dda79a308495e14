"""lorafy: replace targeted leaves of a parameter tree with LoraWeight nodes.

Pass the function that uses the parameters (``fn=``, with example ``args=``)
and every weight gets the layout that function gives it: Flax ``(in, out)``
kernels, Equinox ``(out, in)`` weights, conv kernels, multi-axis DenseGeneral
inside ``nn.scan``, Gemma-style einsums, haiku ``layer_stack``. Without ``fn``
the layout is guessed from path and shape (:func:`lora_jax.default_layout`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"dense": {"kernel": jnp.ones((5, 7)), "bias": jnp.zeros(7)}}
    >>> lp = lorafy(params, rank=2, key=jax.random.key(0))
    >>> lp["dense"]["kernel"].a.shape, lp["dense"]["kernel"].b.shape
    ((5, 2), (2, 7))
    >>> bool((merge(lp)["dense"]["kernel"] == 1.0).all())   # B = 0: starts as the base
    True
    >>> eqx_like = {"weight": jnp.ones((7, 5))}              # (out, in), used as x @ W.T
    >>> w = lorafy(eqx_like, rank=2, fn=lambda p, x: x @ p["weight"].T,
    ...            args=(jnp.ones((3, 5)),))["weight"]
    >>> w.in_axes, w.a.shape, w.b.shape                      # A on the input side
    ((1,), (5, 2), (2, 7))
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from lora_jax.core import (
    Targets,
    checks,
    is_float_array,
    is_implicit,
    path_str,
    select_leaves,
)
from lora_jax.lora.infer import layouts_for
from lora_jax.lora.layout import LayoutSpec, check_layout_spec
from lora_jax.lora.weight import LoraWeight

_INITS = ("kaiming", "gaussian")


def _pattern_value(pattern: Mapping[re.Pattern, Any], path: str, default):
    for rx, value in pattern.items():
        if rx.search(path):
            return value
    return default


def _check_target(path: str, leaf):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
        raise TypeError(f"lorafy: leaf {path!r} is a {type(leaf).__name__}, not an array; "
                        "exclude it from targets.")
    if not is_float_array(leaf):
        raise ValueError(f"lorafy: leaf {path!r} has dtype {leaf.dtype}; LoRA needs a floating "
                         "weight. Exclude it from targets.")
    if len(leaf.shape) < 2:
        raise ValueError(f"lorafy: leaf {path!r} has shape {tuple(leaf.shape)}; LoRA needs "
                         "ndim >= 2. Exclude it from targets.")


def _rank(what, name, value):
    return checks.positive_int(what, name, value, fix="LoRA ranks are whole numbers such as 8.")


def _alpha(what, name, value):
    return checks.number(what, name, value, fix="alpha sets scale = alpha / rank.")


def _pattern_rank(key, value):
    return _rank("lorafy", f"rank_pattern gives leaf paths matching {key!r} a rank that", value)


def _pattern_alpha(key, value):
    return _alpha("lorafy", f"alpha_pattern gives leaf paths matching {key!r} an alpha that",
                  value)


def _check_args(params, rank, alpha, key, rslora, init, dtype, layout, fn, args, kwargs):
    """Every argument of :func:`lorafy`, before anything is traced or drawn."""
    checks.tree("lorafy", "params", params)
    _rank("lorafy", "rank", rank)
    if alpha is not None:
        _alpha("lorafy", "alpha", alpha)
    if key is not None:
        checks.prng_key("lorafy", "key", key)
    checks.boolean("lorafy", "rslora", rslora)
    checks.one_of("lorafy", "init", init, _INITS)
    checks.floating_dtype("lorafy", "dtype", dtype)
    check_layout_spec("lorafy", layout)
    checks.callable_or_none("lorafy", "fn", fn)
    checks.fn_args("lorafy", args, kwargs)


def _rank_alpha(path, rank, alpha, rank_pattern, alpha_pattern):
    r = _pattern_value(rank_pattern, path, rank)
    a = _pattern_value(alpha_pattern, path, alpha if alpha is not None else r)
    return int(r), float(a)


def _unused_patterns(chosen, **patterns) -> None:
    """A pattern that picks no target is a typo that would silently keep the default."""
    paths = [p for p, _, _ in chosen]
    for name, pattern in patterns.items():
        for rx in pattern:
            if not any(rx.search(p) for p in paths):
                raise ValueError(f"lorafy: {name} key {rx.pattern!r} matches no target; the "
                                 f"targets are {paths[:6]}. Fix the regex or drop the entry.")


def _factors(k, leaf, path, r, lay, init, dtype):
    """A [*S, *I, r] (Kaiming-uniform or Gaussian) and B [*S, r, *O] (zeros)."""
    s, in_axes = lay
    shape = tuple(leaf.shape)
    rest = shape[s:]
    i_shape = tuple(rest[j] for j in in_axes)
    o_shape = tuple(d for j, d in enumerate(rest) if j not in in_axes)
    fan_in, fan_out = math.prod(i_shape), math.prod(o_shape)
    if r > min(fan_in, fan_out):
        raise ValueError(
            f"rank {r} exceeds min(in={fan_in}, out={fan_out}) of leaf {path!r} (shape {shape}, "
            f"stacked axes {s}, input axes {in_axes}); lower rank or give this leaf one via "
            "rank_pattern (if the input/output split looks wrong, pass fn= and args=).")
    if init == "kaiming":
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(k, (*shape[:s], *i_shape, r), jnp.float32, -bound, bound)
    else:
        a = jax.random.normal(k, (*shape[:s], *i_shape, r), jnp.float32) / r
    return a.astype(dtype), jnp.zeros((*shape[:s], r, *o_shape), dtype)


def lorafy(params, rank: int = 8, *, alpha: float | None = None, targets: Targets = None,
           key: jax.Array | None = None, rank_pattern: Mapping[str, int] | None = None,
           alpha_pattern: Mapping[str, float] | None = None, rslora: bool = False,
           init: str = "kaiming", layout: LayoutSpec = None, dtype=None,
           fn: Callable | None = None, args: tuple = (), kwargs: Mapping[str, Any] | None = None):
    """Return ``params`` with targeted leaves replaced by :class:`LoraWeight` nodes.

    Args:
      params: any pytree of arrays: a Flax variables/params dict, an NNX State, a
        haiku params dict, an Equinox module (QuantizedWeight leaves may be targeted too).
      rank: LoRA rank r (> 0, <= min(in, out) of every target).
      alpha: scale numerator; ``scale = alpha / r`` (``alpha / sqrt(r)`` if ``rslora``).
        Defaults to ``rank`` (scale 1), as the LoRA paper fixes alpha to the first r tried.
      targets: ``None`` = with ``fn``, every floating leaf with ndim >= 2 that ``fn``
        contracts as a weight (embedding tables, only gathered, excluded); without it,
        leaves named ``kernel``/``weight``/``w`` (see :mod:`lora_jax.core.targets`).
        Else a regex searched in the '/'-joined key path, a list of them (each must
        match), or ``predicate(path, leaf) -> bool``.
      key: PRNG key for A's init (default ``jax.random.key(0)``).
      rank_pattern / alpha_pattern: ``{regex: value}`` per-target overrides, first match wins.
      init: ``"kaiming"`` (PEFT's default: A ~ U(+-1/sqrt(fan_in))) or ``"gaussian"``
        (A ~ N(0, 1/r^2), PEFT's ``init_lora_weights="gaussian"``). B is always zero.
      layout: ``{regex or path: (stack_ndim, in_axes)}`` or ``callable(path, leaf)``;
        overrides what ``fn`` shows (see :mod:`lora_jax.lora.layout`).
      dtype: dtype of A and B (default: the weight's dtype).
      fn, args, kwargs: the function that uses ``params`` as ``fn(params, *args, **kwargs)``
        and example inputs; it is traced abstractly (no FLOPs) to read each weight's
        layout, so the factors are PEFT's: A on the input side, B (zero) on the output side.
    """
    _check_args(params, rank, alpha, key, rslora, init, dtype, layout, fn, args, kwargs)
    rank_pattern = checks.pattern_map("lorafy", "rank_pattern", rank_pattern, _pattern_rank)
    alpha_pattern = checks.pattern_map("lorafy", "alpha_pattern", alpha_pattern, _pattern_alpha)
    key = jax.random.key(0) if key is None else key
    layout_of, default = layouts_for(params, layout=layout, fn=fn, args=args, kwargs=kwargs,
                                     what="lorafy", require_use=True)
    chosen = select_leaves(params, targets, what="lorafy", default=default)
    _unused_patterns(chosen, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    replace = {}
    for k, (path, _, leaf) in zip(jax.random.split(key, len(chosen)), chosen):
        if isinstance(leaf, LoraWeight):
            raise ValueError(f"lorafy: leaf {path!r} is already a LoraWeight; merge() it first.")
        _check_target(path, leaf)
        r, alpha_ = _rank_alpha(path, rank, alpha, rank_pattern, alpha_pattern)
        lay = layout_of(path, leaf)
        a, b = _factors(k, leaf, path, r, lay, init, dtype or leaf.dtype)
        replace[path] = LoraWeight(leaf, a, b, alpha=alpha_, rslora=bool(rslora), in_axes=lay[1])

    def swap(kp, leaf):
        return replace.get(path_str(kp), leaf)

    return jax.tree_util.tree_map_with_path(swap, params, is_leaf=is_implicit)


def merge(params):
    """A plain tree: every node formed (``w0 + scale * a @ b``; DoRA's ``m * V / ||V||``;
    quantized bases dequantized) for serving/export."""
    checks.tree("merge", "params", params)
    return jax.tree.map(lambda x: x.materialize() if is_implicit(x) else x,
                        params, is_leaf=is_implicit)
