"""PiSSA / OLoRA: A and B from the SVD / QR of ``w0``, with ``w0 := w0 - s*a@b``.

Both take a lorafied tree and return it with the model unchanged at step 0, and the
same factors as PEFT's ``init_lora_weights="pissa"`` / ``"olora"`` (singular vectors up
to sign). Any weight layout: the factorisation runs on ``w0`` arranged ``[*S, *I, *O]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

from lora_jax.core import checks, is_implicit, path_str
from lora_jax.lora import LoraWeight
from lora_jax.variants.dora import DoraWeight, is_lora_or_dora

# ----------------------------------------------------------------------------- PiSSA / OLoRA

def _per_layer(w: LoraWeight):
    """(w0 as float32 [P, fan_in, fan_out], S shape, I shape, O shape)."""
    if is_implicit(w.w0) or not hasattr(w.w0, "dtype"):
        raise TypeError(
            f"the base weight is a {type(w.w0).__name__}; PiSSA/OLoRA need a float base. "
            "Initialise on the float model and quantize the residual afterwards "
            "(as PEFT requires for PiSSA).")
    if not jnp.issubdtype(w.w0.dtype, jnp.floating):
        raise TypeError(f"the base weight has dtype {w.w0.dtype}; PiSSA/OLoRA need a float base.")
    if checks.is_concrete(w.w0) and not bool(jnp.isfinite(w.w0).all()):
        raise ValueError("the base weight holds NaN or Inf; its SVD/QR would give NaN factors. "
                         "Fix the weights first.")
    s, n_in = w.stack_ndim, w.in_ndim
    canon = w.to_canonical(jnp.asarray(w.w0, jnp.float32))           # [*S, *I, *O]
    S, I, O = canon.shape[:s], canon.shape[s:s + n_in], canon.shape[s + n_in:]
    return canon.reshape(math.prod(S), math.prod(I), math.prod(O)), S, I, O


def _rebuild(w: LoraWeight, w0f, af, bf, S, I, O) -> LoraWeight:
    r = w.rank
    return dataclasses.replace(
        w, w0=w.from_canonical(w0f.reshape((*S, *I, *O))).astype(w.w0.dtype),
        a=af.reshape((*S, *I, r)).astype(w.a.dtype), b=bf.reshape((*S, r, *O)).astype(w.b.dtype))


def _map_init(params, fn, what: str):
    checks.tree(what, "params", params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_lora_or_dora)
    out, n = [], 0
    for kp, leaf in flat:
        if isinstance(leaf, DoraWeight):
            raise TypeError(f"{what}: leaf {path_str(kp)!r} is a DoraWeight; initialise the "
                            "LoraWeight tree first, then call to_dora().")
        if isinstance(leaf, LoraWeight):
            try:
                leaf = fn(leaf)
            except (TypeError, ValueError) as e:
                kind = TypeError if isinstance(e, TypeError) else ValueError
                raise kind(f"{what}: leaf {path_str(kp)!r}: {e}") from None
            n += 1
        out.append(leaf)
    if not n:
        raise ValueError(f"{what}: params hold no LoraWeight; lorafy() them first.")
    return jax.tree_util.tree_unflatten(treedef, out)


def pissa_init(params):
    """PiSSA: A/B from the top-r SVD of ``w0``, ``w0 := w0 - s*a@b`` (PEFT ``"pissa"``).

    With ``w0 = U diag(S) Vh`` (our (in, out) layout, per stacked layer, I and O
    flattened): ``a = U[:, :r] * sqrt(S_r / s)``, ``b = sqrt(S_r / s)[:, None] * Vh[:r]``.
    PEFT computes the same factors from the torch weight ``W = w0.T`` (``lora_A = a.T``,
    ``lora_B = b.T``), singular vectors up to a common sign per pair. Computed in float32
    and cast back to each leaf's dtype, as PEFT does.
    """
    def one(w: LoraWeight):
        w0, S, I, O = _per_layer(w)
        r, s = w.rank, w.scale
        u, sv, vh = jnp.linalg.svd(w0, full_matrices=False)
        root = jnp.sqrt(sv[:, :r] / s)                               # [P, r]
        a = u[:, :, :r] * root[:, None, :]
        b = root[:, :, None] * vh[:, :r, :]
        res = w0 - s * jnp.einsum("pir,pro->pio", a, b, precision=lax.Precision.HIGHEST)
        return _rebuild(w, res, a, b, S, I, O)
    return _map_init(params, one, "pissa_init")


def olora_init(params):
    """OLoRA: A/B from the QR of the torch-layout weight, ``w0 := w0 - s*a@b`` (PEFT ``"olora"``).

    PEFT: ``Q, R = qr(W)`` with ``W = w0.T [out, in]``, ``lora_B = Q[:, :r]``,
    ``lora_A = R[:r]``; here ``b = Q[:, :r].T``, ``a = R[:r].T`` (A is not rescaled by
    ``1/s``, as in PEFT).
    """
    def one(w: LoraWeight):
        w0, S, I, O = _per_layer(w)
        r, s = w.rank, w.scale
        q, rr = jnp.linalg.qr(jnp.swapaxes(w0, 1, 2))                # [P,out,k], [P,k,in]
        b = jnp.swapaxes(q[:, :, :r], 1, 2)                          # [P, r, out]
        a = jnp.swapaxes(rr[:, :r, :], 1, 2)                         # [P, in, r]
        res = w0 - s * jnp.einsum("pir,pro->pio", a, b, precision=lax.Precision.HIGHEST)
        return _rebuild(w, res, a, b, S, I, O)
    return _map_init(params, one, "olora_init")
