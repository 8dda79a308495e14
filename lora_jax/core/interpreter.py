"""interpret(fn): run any JAX function with implicit nodes in its arguments.

``fn`` is traced to a jaxpr with each node replaced by an abstract array of its
shape and dtype; the jaxpr is then evaluated with the real nodes. Equations
that touch no node are bound as they are; the others go to the rules of
:mod:`lora_jax.core.registry`. When no rule applies, the node is formed with
``materialize()``: silently for frozen nodes (a quantized base is meant to be
dequantized), with a :class:`MaterializationWarning` naming the parameter for
nodes that have trainable fields (``strict=True`` raises instead).

With ``dropout=p`` and a ``dropout_key=`` at call time, rules that support it
(LoRA's ``dot_general`` and ``conv``) feed the adapter path a dropped-out input
(:meth:`Context.drop`); the base path always sees the input as it is.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from lora_jax.core import checks, compat
from lora_jax.core.implicit import ImplicitArray, is_implicit
from lora_jax.core.registry import rules_for
from lora_jax.core.tree import path_str


class MaterializationWarning(UserWarning):
    """A node with trainable fields was formed as a dense array (correct, slower), or was
    used as its layout does not expect (correct, but its layout was probably guessed wrong)."""


class MaterializationError(TypeError):
    """Raised instead of :class:`MaterializationWarning` under ``strict=True``."""


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called from ``Context.warn``: the first
    frame outside this package, i.e. the user's line that called the function."""
    frame, level = sys._getframe(2), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


class Context:
    """State of one interpreted call, passed to every rule.

    ``names`` maps a node (by identity) to the '/'-joined path of the argument it
    came from, so messages name the parameter even after rules rebuilt it.
    """

    def __init__(self, strict: bool, warned: set, dropout: float = 0.0, key=None,
                 vjp_only: bool = False):
        self.strict = strict
        self.vjp_only = vjp_only        # see compat.vjp_only: rules may use custom_vjp
        self.warned = warned            # shared by every call of one interpreted fn
        self.names: dict[int, tuple[object, str]] = {}
        self.read_in: set[str] = set()      # parameters used from their input side so far
        self.reason: str | None = None
        self.dropout = dropout if key is not None else 0.0
        self.key, self.n_keys = key, 0

    def next_key(self):
        """``fold_in(dropout_key, k)`` for the k-th draw of this call (k = 0, 1, ...)."""
        key = jax.random.fold_in(self.key, self.n_keys)
        self.n_keys += 1
        return key

    def drop(self, x):
        """``x`` with inverted dropout when training (a ``dropout_key`` was given): each
        element kept with probability ``1 - p`` (``bernoulli(next_key(), 1 - p, x.shape)``)
        and divided by ``1 - p``, the rest zero. Without a key, ``x`` itself."""
        if not self.dropout:
            return x
        keep = 1.0 - self.dropout
        mask = jax.random.bernoulli(self.next_key(), keep, x.shape)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))

    @contextlib.contextmanager
    def key_scope(self, key):
        """Draws inside use ``key`` (one loop iteration's), counted from 0."""
        saved = self.key, self.n_keys
        self.key, self.n_keys = key, 0
        try:
            yield
        finally:
            self.key, self.n_keys = saved

    def name(self, x) -> str:
        entry = self.names.get(id(x))
        return entry[1] if entry else "<an intermediate value>"

    def set_name(self, x, name: str) -> None:
        if is_implicit(x) and id(x) not in self.names:
            self.names[id(x)] = (x, name)   # holding x keeps its id from being reused

    def inherit(self, outs, sources) -> None:
        """Give implicit ``outs`` the name of the first named implicit source."""
        named = [self.names[id(s)][1] for s in sources if is_implicit(s) and id(s) in self.names]
        if named:
            for o in jax.tree.leaves(outs, is_leaf=is_implicit):
                self.set_name(o, named[0])

    def carry_names(self, new, old) -> None:
        """Name the nodes a construct rebuilt (``new``) after their outer ``old`` ones."""
        for n, o in zip(new, old):
            if is_implicit(n) and is_implicit(o) and id(o) in self.names:
                self.set_name(n, self.names[id(o)][1])

    def decline(self, reason: str):
        """Return ``NotImplemented`` from a rule, recording why for the message."""
        self.reason = reason
        return NotImplemented

    def eval(self, jaxpr, consts, args):
        return eval_jaxpr(jaxpr, consts, args, self)

    def warn(self, x, why: str) -> None:
        """Report, once per parameter and cause, a use that runs but is probably not meant
        (``strict=True``: raise)."""
        path = self.name(x)
        msg = f"parameter {path!r} ({type(x).__name__} of shape {tuple(x.shape)}) {why}"
        if self.strict:
            raise MaterializationError(f"{msg} (strict=True; pass strict=False to allow it.)")
        if (path, why) not in self.warned:
            self.warned.add((path, why))
            warnings.warn(msg, MaterializationWarning, stacklevel=_user_stacklevel())

    def form(self, x, why: str):
        """``x.materialize()``; reported when ``x`` has trainable fields."""
        if not isinstance(x, ImplicitArray):
            return x
        if type(x).trainable_fields:
            self.warn(x, f"{why} It is formed as a dense array here: correct, but it costs the "
                         "full weight's memory and FLOPs.")
        return x.materialize()


def eval_jaxpr(jaxpr, consts, args, ctx: Context) -> list:
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, compat.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts):
        env[v] = x
    for v, x in zip(jaxpr.invars, args):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if any(is_implicit(x) for x in invals):
            outs = _apply_rules(eqn, invals, ctx)
        else:
            outs = compat.bind(eqn, *invals)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, x in zip(eqn.outvars, outs):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _apply_rules(eqn, invals, ctx: Context):
    name = eqn.primitive.name
    ctx.reason = None
    for rule in rules_for(name, invals):
        out = rule(eqn, invals, ctx)
        if out is not NotImplemented:
            ctx.inherit(out, invals)
            return out
    if ctx.reason:
        why = ctx.reason
    elif name in compat.CUSTOM_NAMES:
        why = (f"enters a custom_jvp/custom_vjp function ({name}), whose derivative rule "
               "needs dense inputs.")
    else:
        kinds = sorted({type(x).__name__ for x in invals if is_implicit(x)})
        why = (f"meets primitive '{name}', which has no rule for {', '.join(kinds)}. "
               "If this use is intended, ignore this; otherwise register a rule with "
               "lora_jax.register.")
    return compat.bind(eqn, *[ctx.form(x, why) for x in invals])


def _is_dynamic(x) -> bool:
    if is_implicit(x) or isinstance(x, jax.Array):
        return True
    return hasattr(x, "__array__") and not isinstance(x, (bool, int, float, complex))


def _abstract(x):
    # Inside a shard_map body the type also says which mesh axes x varies over (a node: any
    # of its leaves); dropping it would trace fn as if every input were replicated, without
    # the pvary eqns that make a replicated x meet a weight split across the shards.
    extra = compat.manual_type(*(jax.tree.leaves(x) if is_implicit(x) else [x]))
    if is_implicit(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, **extra)
    aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type, **extra)


def _unwrap_transparent(tree):
    return jax.tree.map(lambda x: x.materialize() if getattr(x, "transparent", False) else x,
                        tree, is_leaf=is_implicit)


def _dropout_key(kwargs: dict, dropout: float):
    """Pop ``dropout_key`` (only when ``dropout`` is on: otherwise it is ``fn``'s own)."""
    if not dropout:
        return None
    key = kwargs.pop("dropout_key", None)
    if key is not None:
        checks.prng_key("lora", "dropout_key", key)
    return key


def interpret(fn: Callable | None = None, *, strict: bool = False,
              dropout: float = 0.0) -> Callable:
    """Transform ``fn`` so that implicit nodes in its arguments are applied lazily.

    Same signature and outputs as ``fn`` (nodes that ``fn`` returns come back as
    nodes). Arrays and nodes anywhere in the arguments are traced; other leaves
    (Python scalars, strings, functions) are static. Composes with ``jax.jit``,
    ``grad``, ``vmap``, and nests. With ``dropout`` > 0 the result also takes a
    keyword ``dropout_key=`` (see :meth:`Context.drop`); without it, no dropout.
    """
    if fn is None:
        return functools.partial(interpret, strict=strict, dropout=dropout)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}.")
    cache: dict = {}
    warned: set = set()

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        drop_key = _dropout_key(kwargs, dropout)
        args, kwargs = _unwrap_transparent((args, kwargs))
        flat, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_implicit)
        leaves = [x for _, x in flat]
        if not any(is_implicit(x) for x in leaves):
            return fn(*args, **kwargs)
        dyn_pos = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
        dyn = [leaves[i] for i in dyn_pos]
        static = tuple((i, x) for i, x in enumerate(leaves) if not _is_dynamic(x))
        avals = [_abstract(x) for x in dyn]

        def flat_fn(*dyn_vals):
            full = list(leaves)
            for i, v in zip(dyn_pos, dyn_vals):
                full[i] = v
            a, kw = jax.tree.unflatten(treedef, full)
            return fn(*a, **kw)

        try:
            key = (treedef, static, tuple((a.shape, a.dtype, a.weak_type) for a in avals))
            hash(key)
        except TypeError:
            key = None
        hit = cache.get(key) if key is not None else None
        if hit is None:
            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
            hit = (closed, jax.tree.structure(out_shape))
            if key is not None:
                if len(cache) > 64:
                    cache.clear()
                cache[key] = hit
        closed, out_tree = hit
        ctx = Context(strict, warned, dropout, drop_key,
                      compat.vjp_only(jax.tree.leaves([dyn, closed.consts])))
        for i in dyn_pos:
            ctx.set_name(leaves[i], _arg_path(flat[i][0]))
        return jax.tree.unflatten(out_tree, eval_jaxpr(closed.jaxpr, closed.consts, dyn, ctx))

    return wrapped


def _arg_path(keypath) -> str:
    """Path of a leaf inside ``(args, kwargs)``, without the leading ``0/<argnum>``
    when there is a single positional argument tree the reader cares about."""
    return path_str(keypath[2:]) or path_str(keypath)
