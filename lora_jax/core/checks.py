"""Argument checks at the public API boundary: one message shape for every bad input.

Each public function checks its arguments once, before any tracing, and raises
``TypeError`` (wrong kind of object: a flag, dtype, key, callable or tree) or
``ValueError`` (a bad value; numbers of the wrong type too, as ``lorafy`` always did)
whose first line reads ``<function>: <argument or leaf path> <what is wrong>; <fix>``.

Values are only looked at when they are concrete: under ``jit`` a leaf is a
tracer whose values are unknown, so :func:`finite_array` skips it (shapes and
dtypes are still checked). Rules that run per primitive never call these.

Example:
    >>> positive_int("lorafy", "rank", 4)
    4
    >>> try:
    ...     number("lorafy", "alpha", float("inf"))
    ... except ValueError as e:
    ...     print(e)
    lorafy: alpha must be a positive finite number, got inf.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core.implicit import is_implicit

_INTS = (int, np.integer)
_REALS = (int, float, np.integer, np.floating)


def _got(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def positive_int(what: str, name: str, value, *, minimum: int = 1, fix: str = "") -> int:
    """``value`` as an int >= ``minimum``; bools and floats (even 2.0) are refused."""
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, _INTS) or value < minimum:
        raise ValueError(f"{what}: {name} must be {kind}, got {_got(value)} "
                         f"({type(value).__name__}). {fix}".rstrip())
    return int(value)


def number(what: str, name: str, value, *, positive: bool = True, fix: str = "") -> float:
    """``value`` as a finite float (> 0 unless ``positive=False``); bools are refused."""
    if isinstance(value, (jax.Array, np.ndarray)) and value.shape == () \
            and not isinstance(value, jax.core.Tracer):
        value = value.item()
    kind = "a positive finite number" if positive else "a finite number"
    if isinstance(value, bool) or not isinstance(value, _REALS) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise ValueError(f"{what}: {name} must be {kind}, got {_got(value)}"
                         f"{'' if isinstance(value, _REALS) else f' ({type(value).__name__})'}. "
                         f"{fix}".rstrip())
    return float(value)


def boolean(what: str, name: str, value) -> bool:
    """``value`` as a bool; a string such as ``"no"`` would silently count as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what}: {name} must be True or False, got {_got(value)} "
                        f"({type(value).__name__}).")
    return bool(value)


def one_of(what: str, name: str, value, choices) -> Any:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{what}: unknown {name} {_got(value)}; choose one of {tuple(choices)}.")
    return value


def floating_dtype(what: str, name: str, dtype):
    """``dtype`` as a numpy dtype, which must be floating (None passes through)."""
    if dtype is None:
        return None
    try:
        d = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{what}: {name}={_got(dtype)} is not a dtype; pass e.g. "
                        "jnp.float32 or jnp.bfloat16.") from None
    if not jnp.issubdtype(d, jnp.floating):
        raise ValueError(f"{what}: {name} must be a floating dtype, got {d}; pass e.g. "
                         "jnp.float32 or jnp.bfloat16.")
    return d


def prng_key(what: str, name: str, key):
    """A typed key (``jax.random.key``) of shape (), or a legacy uint32[2] ``PRNGKey``."""
    dtype = getattr(key, "dtype", None)
    shape = tuple(getattr(key, "shape", (None,)))
    fix = "pass jax.random.key(seed)."
    if dtype is None:
        raise TypeError(f"{what}: {name} must be a PRNG key, got {_got(key)} "
                        f"({type(key).__name__}); {fix}")
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(f"{what}: {name} must be one PRNG key, got a batch of shape "
                             f"{shape}; {fix}")
        return key
    if np.dtype(dtype) != np.uint32 or shape != (2,):
        raise TypeError(f"{what}: {name} must be a PRNG key, got an array {np.dtype(dtype)}"
                        f"{list(shape)}; {fix}")
    return key


def regex(what: str, name: str, pattern) -> re.Pattern:
    if isinstance(pattern, re.Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"{what}: {name} must be a regex string, got {_got(pattern)} "
                        f"({type(pattern).__name__}).")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{what}: {name} {pattern!r} is not a valid regex ({e}).") from None


def pattern_map(what: str, name: str, mapping, check_value: Callable) -> dict:
    """``{compiled regex: check_value(key, value)}`` from a ``{regex: value}`` mapping
    (None: empty)."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise TypeError(f"{what}: {name} must be a dict {{regex: value}}, got "
                        f"{type(mapping).__name__}.")
    return {regex(what, f"{name} key", k): check_value(k, v) for k, v in mapping.items()}


def callable_or_none(what: str, name: str, fn) -> None:
    if fn is not None and not callable(fn):
        raise TypeError(f"{what}: {name} must be callable, got {type(fn).__name__}.")


def fn_args(what: str, fn, args, kwargs) -> tuple:
    """``args`` as a tuple (a bare array would be unpacked row by row), ``kwargs`` a mapping;
    both are example inputs of ``fn``, so they need it."""
    if fn is None and (args or kwargs):
        raise ValueError(f"{what}: args=/kwargs= are example inputs for fn=, which is not "
                         "given, so they would be ignored. Pass fn= (the function that uses the "
                         "params, called as fn(params, *args, **kwargs)) or drop them.")
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"{what}: args must be a tuple of example inputs, got "
                        f"{type(args).__name__}; pass args=(x,) for one input.")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"{what}: kwargs must be a dict, got {type(kwargs).__name__}.")
    return tuple(args)


def is_array_like(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _is_leaf(value) -> bool:
    leaves = jax.tree.leaves(value)
    return len(leaves) == 1 and leaves[0] is value


def tree(what: str, name: str, value) -> None:
    """Refuse a bare scalar, string or other non-array object where a parameter tree goes."""
    if value is None or isinstance(value, (str, bytes)) or (
            not is_implicit(value) and not is_array_like(value) and _is_leaf(value)):
        raise TypeError(f"{what}: {name} must be a parameter pytree (a dict of arrays, an NNX "
                        f"State, an Equinox module), got {_got(value)} "
                        f"({type(value).__name__}).")


def is_concrete(x) -> bool:
    """A real array whose values can be read (not a tracer, shape struct or placeholder)."""
    return isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)


def finite_array(what: str, path: str, x, fix: str) -> None:
    """ValueError naming ``path`` and the first bad element when concrete ``x`` holds
    NaN or Inf; tracers (inside jit) cannot be checked and pass."""
    if not is_concrete(x) or not jnp.issubdtype(x.dtype, jnp.inexact):
        return
    if bool(jnp.isfinite(x).all()):
        return
    host = np.asarray(x)
    bad = np.argwhere(~np.isfinite(host))
    first = tuple(int(i) for i in bad[0])
    raise ValueError(f"{what}: leaf {path!r} holds {len(bad)} non-finite value(s) "
                     f"(first {host[first]} at index {first}); {fix}")
