"""LoftQ: A/B initialised against the quantization error of a 4-bit base (PEFT ``"loftq"``).

QLoRA starts from ``deq(Q(W))`` with ``B = 0``, so the model it fine-tunes is not the
pretrained one. LoftQ (Li et al. 2023; PEFT ``init_lora_weights="loftq"`` with
``LoftQConfig(loftq_bits=4, loftq_iter=T)``) alternates, per targeted weight::

    Q = quant(W - s*A@B)            (A@B = 0 the first time)
    A, B = top-r SVD of W - deq(Q)  (split sqrt(S)/sqrt(s) on each side, as PiSSA)

so that ``deq(Q) + s*A@B`` is closer to ``W`` than ``deq(Q(W))`` is. The result is a
lorafied tree whose ``w0`` is the :class:`~lora_jax.quant.QuantizedWeight` ``Q`` (NF4
exactly as bitsandbytes stores it), ready for QLoRA training.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax.lora import merge
    >>> from lora_jax.quant import dequantize, quantize
    >>> w = jax.random.normal(jax.random.key(0), (64, 48))
    >>> p = loftq_init({"kernel": w}, rank=8)
    >>> type(p["kernel"].w0).__name__
    'QuantizedWeight'
    >>> plain = jnp.linalg.norm(w - dequantize(quantize({"kernel": w}))["kernel"])
    >>> bool(jnp.linalg.norm(w - merge(p)["kernel"]) < plain)
    True
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core import checks, is_implicit
from lora_jax.lora import LoraWeight, lorafy
from lora_jax.quant import quantize_array
from lora_jax.variants.dora import is_lora_or_dora
from lora_jax.variants.init import _map_init, _per_layer, _rebuild, svd_factors

__all__ = ["loftq_init"]


def _has_lora(params) -> bool:
    return any(isinstance(x, LoraWeight)
               for x in jax.tree.leaves(params, is_leaf=is_lora_or_dora))


def _check(params, rank, bits, iters, kind, lorafy_kwargs) -> None:
    what = "loftq_init"
    checks.tree(what, "params", params)
    if bits != 4 or isinstance(bits, bool):
        raise ValueError(f"{what}: bits={bits!r} is not supported; LoftQ here quantizes to 4 "
                         "bits (NF4, FP4 or int4 through kind=). PEFT's 8-bit LoftQ has no "
                         "counterpart.")
    checks.positive_int(what, "iters", iters)
    checks.one_of(what, "kind", kind, ("nf4", "fp4", "int4"))
    if _has_lora(params):
        given = [k for k, v in {"rank": rank, **lorafy_kwargs}.items() if v is not None]
        if given:
            raise ValueError(f"{what}: params are already lorafied, so {given} would be "
                             "ignored; drop them, or pass the plain params to lorafy here.")
    elif rank is None:
        raise ValueError(f"{what}: rank is required for plain params (they are lorafied "
                         "here); pass rank=, e.g. rank=16.")


def loftq_init(params, rank: int | None = None, *, alpha: float | None = None, targets=None,
               bits: int = 4, iters: int = 1, kind: str = "nf4", block_size: int = 64,
               double_quant: bool = True, group_size: int = 128, layout=None,
               rank_pattern=None, alpha_pattern=None, rslora: bool | None = None,
               fn=None, args: tuple = (), kwargs=None):
    """LoftQ init: a lorafied tree over 4-bit bases with ``deq(Q) + s*A@B ~= W``.

    ``params`` are the float weights: plain (lorafied here with ``rank``, ``alpha``,
    ``targets``, ``layout``, ``rank_pattern``, ``alpha_pattern``, ``rslora``, ``fn``/``args``
    /``kwargs`` exactly as :func:`~lora_jax.lora.lorafy`), or already lorafied (then those
    must be left unset). ``iters`` is PEFT's ``loftq_iter`` (alternating steps; 1 = one
    quantization then one SVD of its error). ``kind``/``block_size``/``double_quant``/
    ``group_size`` are :func:`~lora_jax.quant.quantize`'s (PEFT quantizes NF4 blocks of 64
    without double quant; the error is always measured on the base actually stored).

    Unlike PEFT, which stores ``L @ R`` ~= ``W - deq(Q)`` unscaled (exact only when
    ``alpha == r``), A and B are divided by ``sqrt(s)`` each so that the adapter as
    applied, ``s*A@B``, is the SVD approximation for any alpha (as PiSSA does).
    Other leaves are returned as they are. Runs eagerly (values are read to quantize).
    """
    extra = dict(alpha=alpha, targets=targets, layout=layout, rank_pattern=rank_pattern,
                 alpha_pattern=alpha_pattern, rslora=rslora, fn=fn)
    _check(params, rank, bits, iters, kind, extra)
    if not _has_lora(params):
        lk = {k: v for k, v in extra.items() if v is not None}
        params = lorafy(params, rank, args=args, kwargs=kwargs, **lk)
    qopts = dict(block_size=block_size, double_quant=double_quant, group_size=group_size)

    def one(w: LoraWeight):
        if is_implicit(w.w0):
            raise TypeError(f"the base weight is already a {type(w.w0).__name__}; LoftQ "
                            "needs the float weight W (it quantizes W - s*A@B itself).")
        wc, S, I, O = _per_layer(w)                         # float32 [P, in, out]
        target = w.w0.astype(jnp.float32)
        r, s = w.rank, w.scale
        residual = target
        for step in range(iters):
            q = quantize_array(residual, kind, stack_ndim=w.stack_ndim, in_axes=w.in_axes,
                               **qopts).astype(w.w0.dtype)
            deq = w.to_canonical(q.materialize().astype(jnp.float32)).reshape(wc.shape)
            a, b = svd_factors(wc - deq, r, s)
            if step + 1 < iters:
                ab = jnp.einsum("pir,pro->pio", a, b, precision=lax.Precision.HIGHEST)
                residual = target - s * w.from_canonical(ab.reshape((*S, *I, *O)))
        return dataclasses.replace(_rebuild(w, wc, a, b, S, I, O), w0=q)
    return _map_init(params, one, "loftq_init")
