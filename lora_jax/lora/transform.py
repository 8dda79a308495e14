"""lora(fn): run any JAX function with LoRA (and other implicit) weights in its arguments.

The interpreter is :func:`lora_jax.core.interpret`; this module names it for
LoRA and loads LoraWeight's rules (:mod:`lora_jax.lora.rules`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import lorafy
    >>> w = lorafy({"w": jnp.ones((5, 7))}, rank=2, targets="w")["w"]
    >>> y = lora(lambda w, x: x @ w)(w, jnp.ones((3, 5)))
    >>> y.shape, bool((y == 5.0).all())
    ((3, 7), True)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
from jax import lax

from lora_jax.core import checks, interpret, register
from lora_jax.lora import concat as _concat  # noqa: F401  (registers LoraWeight's rules)
from lora_jax.lora import rules as _rules  # noqa: F401
from lora_jax.lora.weight import AdapterNode


def lora(fn: Callable | None = None, *, strict: bool = False, dropout: float = 0.0) -> Callable:
    """Transform ``fn`` so that LoRA weights in its arguments are applied lazily.

    Same signature and outputs as ``fn``. Arrays and nodes anywhere in the
    arguments are traced; other leaves (Python scalars, strings, ...) are static.
    Compose freely: ``jax.jit(lora(f))``, ``lora(jax.jit(f))``, ``jax.grad``, ``jax.vmap``.
    Where a weight meets ``dot_general`` with its input axes contracted it computes
    ``x@W0 + s*(x@A)@B`` without forming ``A@B``; uses with no rule form the dense
    weight and warn (:class:`MaterializationWarning`, naming the parameter and the fix).

    Args:
      fn: any JAX-traceable function (a Flax ``apply``, an NNX/Equinox model
        through its functional split, plain jnp code).
      strict: raise :class:`MaterializationError` instead of warning.
      dropout: PEFT's ``lora_dropout``: the probability p of zeroing an element of
        the adapter's input, ``W0 x + s * B A dropout(x)`` (the base path never drops).
        With p > 0 the transformed function takes a keyword ``dropout_key=`` (a PRNG
        key): pass it when training; without it (evaluation) nothing is dropped. The
        k-th adapted ``dot_general``/``conv`` of a call (k = 0, 1, ...) keeps each element
        of its input where ``jax.random.bernoulli(fold_in(dropout_key, k), 1 - p,
        x.shape)`` and scales it by ``1 / (1 - p)``; a scanned body draws each
        iteration's key from ``split(fold_in(dropout_key, k), length)``. Embedding
        lookups have no dropout, as in PEFT.

    Example (dropout):
        >>> import jax, jax.numpy as jnp
        >>> from lora_jax import lorafy
        >>> w = lorafy({"w": jnp.ones((5, 7))}, rank=2, targets="w", init=False)["w"]
        >>> f = lora(lambda w, x: x @ w, dropout=0.5)
        >>> x = jnp.ones((3, 5))
        >>> bool((f(w, x) == lora(lambda w, x: x @ w)(w, x)).all())   # eval: no dropout
        True
        >>> bool((f(w, x, dropout_key=jax.random.key(1)) != f(w, x)).any())
        True
    """
    checks.callable_or_none("lora", "fn", fn)
    checks.boolean("lora", "strict", strict)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
            or not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora: dropout must be a number in [0, 1), got {dropout!r}; it is "
                         "the probability of dropping an adapter input element (e.g. 0.05).")
    if fn is None:
        return functools.partial(lora, strict=strict, dropout=dropout)
    inner = interpret(fn, strict=strict, dropout=float(dropout))

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return inner(*_freeze(args), **_freeze(kwargs))

    return wrapped


def _freeze(tree):
    """Every adapter node's ``w0`` under ``stop_gradient``, once, on the way in.

    The rules then use ``w0`` as it comes. Inside a scanned body a ``stop_gradient``
    would turn each layer's slice of ``w0`` into a new value, which JAX then saves for the
    backward pass: a stacked copy of every frozen weight, written on every step.
    """
    def freeze(x):
        if isinstance(x, AdapterNode) and x.w0 is not None:
            return dataclasses.replace(x, w0=jax.tree.map(lax.stop_gradient, x.w0))
        return x

    return jax.tree.map(freeze, tree, is_leaf=lambda x: isinstance(x, AdapterNode))


def register_dot_rule(node_type: type, rule: Callable) -> None:
    """Give ``node_type`` its own ``dot_general`` rule ``rule(eqn, invals, ctx)``.

    Shorthand for ``lora_jax.register("dot_general", node_type, rule)``; the rule
    returns the output, or ``NotImplemented`` to fall back to ``node.materialize()``.
    """
    register("dot_general", node_type, rule)
