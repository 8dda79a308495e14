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
import warnings
from typing import Any, Callable, Mapping

import jax

from lora_jax.core import (
    Targets,
    checks,
    is_float_array,
    is_implicit,
    leaf_name,
    path_str,
    select_leaves,
)
from lora_jax.lora.factors import RankWarning, check_init, init_factors
from lora_jax.lora.infer import layouts_for
from lora_jax.lora.layout import LayoutSpec, check_layout_spec
from lora_jax.lora.trainable import Trainable, trainable_paths, wrap_paths
from lora_jax.lora.weight import LoraWeight


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
    if _empty(leaf):
        raise ValueError(f"lorafy: leaf {path!r} of shape {tuple(leaf.shape)} is empty; "
                         "exclude it from targets.")
    if not is_implicit(leaf):          # a quantized base was checked by quantize
        checks.finite_array("lorafy", path, leaf, "A base holding NaN/Inf makes every output "
                            "of the adapted layer NaN. Fix the weights first.")


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
    check_init("lorafy", init)
    checks.floating_dtype("lorafy", "dtype", dtype)
    check_layout_spec("lorafy", layout)
    checks.callable_or_none("lorafy", "fn", fn)
    checks.fn_args("lorafy", fn, args, kwargs)


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


def _empty(leaf) -> bool:
    return math.prod(getattr(leaf, "shape", (1,))) == 0


def _lora_targets(params, targets, trainable, default) -> tuple[list, set]:
    """The LoRA targets and the paths trained in full; a leaf cannot be both. With the
    default targets, trainable leaves are simply not LoRA targets (as PEFT skips a
    ``modules_to_save`` module when it injects LoRA)."""
    full = set() if trainable is None else trainable_paths(params, trainable, "lorafy")
    found = select_leaves(params, targets, what="lorafy", default=default)
    chosen = [e for e in found if not (targets is None and (e[0] in full or _empty(e[2])))]
    both = [p for p, _, _ in chosen if p in full]
    if both:
        raise ValueError(f"lorafy: leaf {both[0]!r} is both a LoRA target and trainable; a leaf "
                         "is either adapted or trained in full. Drop it from targets or from "
                         "trainable.")
    if not chosen:
        raise ValueError(f"lorafy: every default target ({[p for p, _, _ in found][:4]}) is "
                         "empty or marked trainable, so no leaf is left for LoRA; pass targets=.")
    return chosen, full


def _warn_rank(too_big: list[tuple[str, int]], guessed: bool) -> None:
    if too_big:
        ranks = sorted({r for _, r in too_big})
        # a 3-D einsum kernel guessed as a stack of matrices looks too small for its rank
        guess = (" The layouts were guessed from names and shapes (no fn=): if a guess is "
                 "wrong, pass fn= and args= so they are read off the model."
                 if guessed else "")
        warnings.warn(
            f"lorafy: rank {', '.join(map(str, ranks))} exceeds min(in, out) of "
            f"{[p for p, _ in too_big][:4]}; "
            "accepted, as PEFT does, but the update's rank is at most min(in, out), so the "
            "extra rank only adds parameters. Lower the rank or set one per leaf with "
            f"rank_pattern.{guess}", RankWarning, stacklevel=3)


def lorafy(params, rank: int = 8, *, alpha: float | None = None, targets: Targets = None,
           key: jax.Array | None = None, rank_pattern: Mapping[str, int] | None = None,
           alpha_pattern: Mapping[str, float] | None = None, rslora: bool = False,
           init: str | bool = "kaiming", layout: LayoutSpec = None, dtype=None,
           fn: Callable | None = None, args: tuple = (), kwargs: Mapping[str, Any] | None = None,
           trainable: Targets = None):
    """Return ``params`` with targeted leaves replaced by :class:`LoraWeight` nodes.

    Args:
      params: any pytree of arrays: a Flax variables/params dict, an NNX State, a
        haiku params dict, an Equinox module (QuantizedWeight leaves may be targeted too).
      rank: LoRA rank r (> 0). A rank above min(in, out) of a target is accepted, as in
        PEFT, with one :class:`RankWarning` per call naming the leaves.
      alpha: scale numerator; ``scale = alpha / r`` (``alpha / sqrt(r)`` if ``rslora``).
        Defaults to ``rank`` (scale 1), as the LoRA paper fixes alpha to the first r tried.
      targets: ``None`` = with ``fn``, every floating leaf with ndim >= 2 that ``fn``
        contracts as a weight (embedding tables, only gathered, excluded); without it,
        leaves named ``kernel``/``weight``/``w`` (see :mod:`lora_jax.core.targets`).
        Else a regex searched in the '/'-joined key path, a list of them (each must
        match), or ``predicate(path, leaf) -> bool``.
      key: PRNG key for A's init (default ``jax.random.key(0)``).
      rank_pattern / alpha_pattern: ``{regex: value}`` per-target overrides, first match wins.
      init: PEFT's ``init_lora_weights``: ``"kaiming"``/``True`` (default: A ~
        U(+-1/sqrt(fan_in)), B = 0), ``"gaussian"`` (A ~ N(0, 1/r^2), B = 0),
        ``"orthogonal"`` (both nonzero, A @ B = 0; even rank) or ``False`` (both random:
        B != 0). Embedding tables get PEFT's embedding init (vocabulary-side factor zero,
        the other N(0, 1)). See :mod:`lora_jax.lora.factors`.
      layout: ``{regex or path: (stack_ndim, in_axes)}`` or ``callable(path, leaf)``;
        overrides what ``fn`` shows (see :mod:`lora_jax.lora.layout`).
      dtype: dtype of A and B (default: the weight's dtype).
      fn, args, kwargs: the function that uses ``params`` as ``fn(params, *args, **kwargs)``
        and example inputs; it is traced abstractly (no FLOPs) to read each weight's
        layout, so the factors are PEFT's: A on the input side, B (zero) on the output side.
      trainable: leaves to train in full next to the adapters (PEFT's ``modules_to_save``:
        a classification head, norms, an embedding with new tokens), picked like
        ``targets``; they become :class:`Trainable` nodes. With the default targets they
        are not LoRA targets; a leaf named by both targets and trainable is refused.
    """
    _check_args(params, rank, alpha, key, rslora, init, dtype, layout, fn, args, kwargs)
    rank_pattern = checks.pattern_map("lorafy", "rank_pattern", rank_pattern, _pattern_rank)
    alpha_pattern = checks.pattern_map("lorafy", "alpha_pattern", alpha_pattern, _pattern_alpha)
    key = jax.random.key(0) if key is None else key
    layout_of, default = layouts_for(params, layout=layout, fn=fn, args=args, kwargs=kwargs,
                                     what="lorafy", require_use=True)
    chosen, full = _lora_targets(params, targets, trainable, default)
    _unused_patterns(chosen, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    gathered = getattr(layout_of, "gathered", frozenset())
    replace, too_big = {}, []
    for k, (path, _, leaf) in zip(jax.random.split(key, len(chosen)), chosen):
        if isinstance(leaf, (LoraWeight, Trainable)):
            raise ValueError(f"lorafy: leaf {path!r} is already a {type(leaf).__name__}; "
                             "merge() it first.")
        _check_target(path, leaf)
        r, alpha_ = _rank_alpha(path, rank, alpha, rank_pattern, alpha_pattern)
        lay = layout_of(path, leaf)
        embedding = path in gathered or (fn is None and leaf_name(path) == "embedding")
        a, b, big = init_factors(k, tuple(leaf.shape), r, lay, init, dtype or leaf.dtype,
                                 embedding=embedding, path=path)
        if big:
            too_big.append((path, r))
        replace[path] = LoraWeight(leaf, a, b, alpha=alpha_, rslora=bool(rslora), in_axes=lay[1])
    _warn_rank(too_big, guessed=fn is None and layout is None)

    def swap(kp, leaf):
        return replace.get(path_str(kp), leaf)

    return wrap_paths(jax.tree_util.tree_map_with_path(swap, params, is_leaf=is_implicit), full)


def merge(params):
    """A plain tree: every node formed (``w0 + scale * a @ b``; DoRA's ``m * V / ||V||``;
    quantized bases dequantized) for serving/export."""
    checks.tree("merge", "params", params)
    return jax.tree.map(lambda x: x.materialize() if is_implicit(x) else x,
                        params, is_leaf=is_implicit)
