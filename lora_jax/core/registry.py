"""One rule registry keyed by (primitive, node type).

A rule tells the interpreter what a primitive does when one of its operands is
an implicit node: ``rule(eqn, invals, ctx)`` returns the primitive's output
(arrays, or new nodes), or ``NotImplemented`` to let the next candidate try;
when none applies, the node is formed with ``materialize()``. Every built-in
rule (dot, conv, gather, transpose, reshape, convert, control flow) is
registered here exactly as a user's rule would be. Lookup follows each
implicit operand's MRO, so a rule registered for :class:`ImplicitArray`
applies to every node type that has no rule of its own.

Example:
    >>> import dataclasses, jax, jax.numpy as jnp
    >>> from lora_jax.core import ImplicitArray, node, interpret, register
    >>> @node
    ... @dataclasses.dataclass(frozen=True)
    ... class Scaled(ImplicitArray):          # stands for value * factor
    ...     value: jax.Array
    ...     factor: jax.Array
    ...     shape = property(lambda self: self.value.shape)
    ...     dtype = property(lambda self: self.value.dtype)
    ...     def materialize(self):
    ...         return self.value * self.factor
    >>> @register("mul", Scaled)
    ... def _mul(eqn, invals, ctx):
    ...     x, y = invals
    ...     if isinstance(y, Scaled) or not isinstance(x, Scaled):
    ...         return NotImplemented
    ...     return Scaled(x.value * y, x.factor)  # stays implicit
    >>> f = interpret(lambda w, y: w * y)
    >>> out = f(Scaled(jnp.ones(3), jnp.float32(2.0)), jnp.float32(3.0))
    >>> type(out).__name__, out.materialize().tolist()
    ('Scaled', [6.0, 6.0, 6.0])
"""

from __future__ import annotations

from typing import Callable

from lora_jax.core.implicit import ImplicitArray

Rule = Callable  # rule(eqn, invals, ctx) -> outputs | NotImplemented

_RULES: dict[tuple[str, type], Rule] = {}


def _name(primitive) -> str:
    return primitive if isinstance(primitive, str) else primitive.name


def register(primitive, node_type: type = ImplicitArray, rule: Rule | None = None):
    """Register ``rule`` for ``primitive`` (a name or a JAX primitive) on ``node_type``.

    Use as a decorator (``@register("dot_general", MyNode)``) or call with ``rule=``.
    Registering again for the same pair replaces the rule.
    """
    if not (isinstance(node_type, type) and issubclass(node_type, ImplicitArray)):
        raise TypeError(
            f"register: node_type must be an ImplicitArray subclass, got {node_type!r}.")

    def add(fn: Rule) -> Rule:
        if not callable(fn):
            raise TypeError(f"register: rule must be callable, got {fn!r}.")
        _RULES[(_name(primitive), node_type)] = fn
        return fn

    return add if rule is None else add(rule)


def rules_for(name: str, invals) -> list[Rule]:
    """Candidate rules for an equation: every operand's own types first, the generic
    :class:`ImplicitArray` rules (control flow) last; each rule once."""
    classes = [cls for x in invals if isinstance(x, ImplicitArray)
               for cls in type(x).__mro__ if cls is not ImplicitArray]
    out: list[Rule] = []
    for cls in (*classes, ImplicitArray):
        rule = _RULES.get((name, cls))
        if rule is not None and rule not in out:
            out.append(rule)
    return out
