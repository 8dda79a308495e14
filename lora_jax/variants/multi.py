"""Several named adapters over one frozen base: stacking, per-row selection, combination.

One tree holds N adapters: every adapted leaf becomes a :class:`MultiLoraWeight` whose
A/B carry an adapter axis right after the stacked-layer axes::

    w0: [*S, *I, *O]       (shared, frozen; array or QuantizedWeight)
    a:  [*S, N, *I, r]     (r = the largest rank; smaller adapters are zero-padded)
    b:  [*S, N, r, *O]
    ids: [*S, B] int32     (per batch row: adapter index, -1 = base; None until set)

The adapter axis comes *after* S (not first) so that ``lax.scan`` / ``nn.scan`` over
stacked layers slices ``w0``, ``a``, ``b`` and ``ids`` along axis 0 alike; ``ids`` is
broadcast over S for the same reason. Names, ranks, alphas and rsLoRA flags are static.

**Per-row contract.** ``with_adapter_ids(params, ids)`` sets ``ids`` (length B, ints or
names; ``-1``/``None`` = base). Under :func:`lora_jax.lora` (rules in
:mod:`lora_jax.variants.multi_rules`) such a weight serves three uses, each with one
batch-row axis of length B:

* ``dot_general`` as ``x @ W`` (W the rhs, contracted over its input axes), rows on
  axis 0 of ``x``: ``x @ w0`` once for the batch, then each row's A/B gathered
  (``a[ids]: [B, *I, r]``) in two batched matmuls, ``((x @ a[ids]) * s[ids]) @ b[ids]``;
* an embedding lookup (a gather of table rows), rows on axis 0 of the token ids:
  each token's row of its batch row's A, then that row's B;
* a convolution (kernel ``[*window, in, out]``), rows on the input's batch axis: each
  row's A as a conv with W's window, then its B per pixel (the 1x1 conv of the
  single-adapter rule), all rows in one batched call.

Rows with id -1 get exactly the base output. A DoRA adapter in the stack
(:class:`MultiDoraWeight`) also scales its rows by ``m / ||w0 + s*a@b||`` per output
feature, the norms taken for all adapters at once without forming any weight
(:func:`~lora_jax.variants.dora.gram_norm`). ``ids`` are data: switching which
adapter each row uses, or replacing an adapter's weights under the same name
(:func:`set_adapter`), never recompiles. Adding or removing an adapter changes N and the
static names, so a jitted function retraces once for the new set. Under jit,
out-of-range ids cannot raise; they act as the base (``with_adapter_ids`` checks
concrete ids and raises ``ValueError``). Any other use of the weight (a transpose,
the weight as lhs, a tied embedding's ``attend``) raises ``TypeError``: a per-row
weight has no single dense form.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax import lorafy, lora
    >>> base = {"k": jnp.ones((5, 7))}
    >>> ad = {n: lorafy(base, rank=2, targets="k", key=jax.random.key(i))
    ...       for i, n in enumerate(["fr", "de"])}
    >>> mp = stack_adapters(ad)
    >>> mp["k"].a.shape, adapter_names(mp)
    ((2, 5, 2), ('fr', 'de'))
    >>> routed = with_adapter_ids(mp, ["de", None, "fr"])      # one adapter per batch row
    >>> y = lora(lambda p, x: x @ p["k"])(routed, jnp.ones((3, 5)))
    >>> y.shape
    (3, 7)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lora_jax.core import checks, node, static
from lora_jax.lora import AdapterNode, LoraWeight, lora_scale
from lora_jax.variants.dora import DoraWeight

BASE = -1


@node
@dataclasses.dataclass(frozen=True)
class MultiLoraWeight(AdapterNode):
    """N named LoRA adapters over one base weight; see the module docstring for shapes."""

    w0: Any
    a: Any
    b: Any
    ids: Any = None
    names: tuple = static(())
    ranks: tuple = static(())       # true rank per adapter (0: no LoRA on this leaf)
    alphas: tuple = static(())
    rsloras: tuple = static(())
    in_ndim: int = static(1)

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b")

    def __post_init__(self):
        # Static fields, and a concrete a: a user may build the node from tracers.
        n = len(self.names)
        if not (len(self.ranks) == len(self.alphas) == len(self.rsloras) == n):
            raise ValueError(f"MultiLoraWeight: names, ranks, alphas and rsloras must have one "
                             f"entry per adapter, got {n}, {len(self.ranks)}, "
                             f"{len(self.alphas)}, {len(self.rsloras)}; build it with "
                             "stack_adapters().")
        if checks.is_concrete(self.a) and self.a.ndim >= 2 + self.in_ndim \
                and self.a.shape[self.stack_ndim] != n:
            raise ValueError(f"MultiLoraWeight: a of shape {tuple(self.a.shape)} holds "
                             f"{self.a.shape[self.stack_ndim]} adapters, names {n}.")

    @property
    def num_adapters(self) -> int:
        return len(self.names)

    @property
    def in_axes(self) -> tuple[int, ...]:
        return tuple(range(self.in_ndim))

    @property
    def stack_ndim(self) -> int:
        return self.a.ndim - self.in_ndim - 2

    @property
    def scales(self) -> tuple[float, ...]:
        return tuple(0.0 if r == 0 else lora_scale(al, r, rs)
                     for r, al, rs in zip(self.ranks, self.alphas, self.rsloras))

    def adapter(self, index: int):
        """Adapter ``index`` as a :class:`LoraWeight` (or ``w0`` if it has no LoRA here)."""
        r = self.ranks[index]
        if r == 0:
            return self.w0
        s = self.stack_ndim
        a = jnp.take(self.a, index, axis=s)[..., :r]
        b = lax.slice_in_dim(jnp.take(self.b, index, axis=s), 0, r, axis=s)
        return LoraWeight(self.w0, a, b, alpha=self.alphas[index], rslora=self.rsloras[index],
                          in_ndim=self.in_ndim)

    def materialize(self):
        raise TypeError(
            "MultiLoraWeight holds one weight per batch row and has no single dense form. "
            "Under lora(fn) it supports dot_general as x @ W with the batch-row axis first "
            "(every Dense/einsum projection), embedding lookups and convolutions (grouped too) "
            "with an HWIO kernel; "
            "for anything else pick one adapter with unstack_adapter(params, name).")

    def astype(self, dtype) -> "MultiLoraWeight":
        return dataclasses.replace(self, w0=self.w0.astype(dtype), a=self.a.astype(dtype),
                                   b=self.b.astype(dtype))


@node
@dataclasses.dataclass(frozen=True)
class MultiDoraWeight(MultiLoraWeight):
    """A stack in which some adapters are DoRA: ``m: [*S, N, *O]`` holds each adapter's
    magnitude (ones, unused, for the others); ``doras[i]`` says whether adapter i is
    DoRA on this leaf."""

    m: Any = None
    doras: tuple = static(())

    trainable_fields: ClassVar[tuple[str, ...]] = ("a", "b", "m")

    def __post_init__(self):
        super().__post_init__()
        if len(self.doras) != len(self.names):
            raise ValueError(f"MultiDoraWeight: doras must have one entry per adapter, got "
                             f"{len(self.doras)} for {len(self.names)}; build it with "
                             "stack_adapters().")

    def adapter(self, index: int):
        """Adapter ``index`` as a :class:`DoraWeight` where it is DoRA on this leaf."""
        lw = super().adapter(index)
        if not self.doras[index] or not isinstance(lw, LoraWeight):
            return lw
        m = jnp.take(self.m, index, axis=self.stack_ndim)
        return DoraWeight(lw.w0, lw.a, lw.b, m, alpha=lw.alpha, rslora=lw.rslora,
                          in_axes=lw.in_axes)

    def astype(self, dtype) -> "MultiDoraWeight":
        return dataclasses.replace(super().astype(dtype), m=self.m.astype(dtype))


def is_multi(x) -> bool:
    return isinstance(x, MultiLoraWeight)


def _multis(params) -> list[MultiLoraWeight]:
    ms = [x for x in jax.tree.leaves(params, is_leaf=is_multi) if is_multi(x)]
    if not ms:
        raise ValueError("params hold no MultiLoraWeight; build them with stack_adapters().")
    return ms


def adapter_names(params) -> tuple[str, ...]:
    """The adapter names of a stacked tree, in index order."""
    return _multis(params)[0].names


def _index(names, name) -> int:
    if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
        if not -len(names) <= name < len(names):
            raise ValueError(f"adapter index {name} out of range for {len(names)} adapters "
                             f"{list(names)}.")
        return int(name) % len(names)
    if name not in names:
        raise ValueError(f"unknown adapter {name!r}; this tree holds {list(names)} "
                         "(add it with add_adapter).")
    return names.index(name)


def unstack_adapter(params, name):
    """The single-adapter tree (LoraWeight nodes) of adapter ``name`` (or its index)."""
    names = adapter_names(params)
    i = _index(names, name)
    return jax.tree.map(lambda x: x.adapter(i) if is_multi(x) else x, params, is_leaf=is_multi)


def adapter_ids(params, rows: Sequence) -> jax.Array:
    """int32 ids for ``rows``: adapter names or indices, ``None`` / ``-1`` = base."""
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise TypeError(f"adapter_ids: rows must be a list (one adapter name, index or None "
                        f"per batch row), got {rows!r}; for one row pass [{rows!r}].")
    names = adapter_names(params)
    out = []
    for r in rows:
        is_int = isinstance(r, (int, np.integer)) and not isinstance(r, bool)
        if r is None or (is_int and r == BASE):
            out.append(BASE)
        else:
            if isinstance(r, (int, np.integer)) and r < 0:
                raise ValueError(f"adapter index {r} out of range for {len(names)} adapters "
                                 f"{list(names)}; use -1 (or None) for the base model.")
            out.append(_index(names, r))
    return jnp.asarray(out, jnp.int32)


def with_adapter_ids(params, ids):
    """``params`` with every MultiLoraWeight routing batch row ``i`` to adapter ``ids[i]``.

    ``ids``: an int array [B] (``-1`` = base) or a sequence of names / indices / ``None``.
    Concrete ids are range-checked; traced ids (inside jit) are not (out of range = base).
    """
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"with_adapter_ids: ids must be a list or int array (one per batch "
                        f"row), got {ids!r}; for one row pass [{ids!r}].")
    ms = _multis(params)
    names = ms[0].names
    if any(m.names != names for m in ms):
        raise ValueError("with_adapter_ids: MultiLoraWeight leaves disagree on adapter names.")
    if not isinstance(ids, jax.Array) and not isinstance(ids, np.ndarray):
        ids = adapter_ids(params, list(ids))
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer) or ids.ndim != 1:
        raise ValueError(f"with_adapter_ids: ids must be a 1-D int array (one per batch row), "
                         f"got {ids.dtype}{list(ids.shape)}.")
    if not isinstance(ids, jax.core.Tracer):
        host = np.asarray(ids)
        bad = host[(host < BASE) | (host >= len(names))]
        if bad.size:
            raise ValueError(f"with_adapter_ids: adapter index {int(bad[0])} out of range for "
                             f"{len(names)} adapters {list(names)}; use -1 for the base model.")
    ids = ids.astype(jnp.int32)

    def put(m):
        if not is_multi(m):
            return m
        s = m.stack_ndim
        full = jnp.broadcast_to(ids, (*m.a.shape[:s], ids.shape[0]))
        return dataclasses.replace(m, ids=full)
    return jax.tree.map(put, params, is_leaf=is_multi)


