"""PiSSA / OLoRA: A and B from the SVD / QR of ``w0``, with ``w0 := w0 - s*a@b``.

Both take a lorafied tree and return it with the model unchanged at step 0, and the
same factors as PEFT's ``init_lora_weights="pissa"`` / ``"olora"`` (singular vectors up
to sign); ``pissa_init(params, niter=K)`` is PEFT's fast ``"pissa_niter_K"`` (a randomized
SVD). Any weight layout: the factorisation runs on ``w0`` arranged ``[*S, *I, *O]``.
:func:`pissa_to_lora` turns a trained PiSSA/OLoRA adapter into a plain LoRA adapter over
the original weights (PEFT's ``path_initial_model_for_weight_conversion``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax.lora import lorafy, merge
    >>> w = jax.random.normal(jax.random.key(1), (7, 5))
    >>> init = pissa_init(lorafy({"kernel": w}, rank=2))
    >>> import dataclasses
    >>> trained = {"kernel": dataclasses.replace(init["kernel"], b=init["kernel"].b * 2)}
    >>> plain = pissa_to_lora(trained, init)
    >>> plain["kernel"].rank, bool(jnp.abs(plain["kernel"].w0 - w).max() < 1e-5)
    (4, True)
    >>> bool(jnp.abs(merge(plain)["kernel"] - merge(trained)["kernel"]).max() < 1e-5)
    True
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


def svd_factors(m, r: int, s: float, *, niter: int | None = None, key=None):
    """``(a [P, in, r], b [P, r, out])`` with ``s * a @ b`` the best rank-r approximation
    of ``m [P, in, out]``: ``a = U_r sqrt(S_r / s)``, ``b = sqrt(S_r / s) Vh_r`` (PEFT's
    PiSSA and LoftQ split). ``niter``: a randomized SVD instead (:func:`randomized_svd`).
    A rank above ``min(in, out)`` gets zero columns/rows beyond it."""
    k = min(r, m.shape[1], m.shape[2])
    if niter is None:
        u, sv, vh = jnp.linalg.svd(m, full_matrices=False)
        u, sv, vh = u[:, :, :k], sv[:, :k], vh[:, :k, :]
    else:
        u, sv, vh = randomized_svd(m, k, niter, key)
    root = jnp.sqrt(sv / s)                                         # [P, k]
    a, b = u * root[:, None, :], root[:, :, None] * vh
    if k < r:
        a = jnp.pad(a, ((0, 0), (0, 0), (0, r - k)))
        b = jnp.pad(b, ((0, 0), (0, r - k), (0, 0)))
    return a, b


def randomized_svd(m, q: int, niter: int, key):
    """``(u [P, n_in, q], sv [P, q], vh [P, q, n_out])``: torch's ``svd_lowrank(m, q, niter)``
    (Halko et al. 2009, alg. 4.4 + 5.1, no oversampling), which PEFT's ``pissa_niter_K``
    calls: a Gaussian sketch of the range, ``niter`` power iterations re-orthonormalised
    by QR, then the exact SVD of the small ``q``-row projection."""
    hi = lax.Precision.HIGHEST
    tall = m.shape[1] >= m.shape[2]
    x = m if tall else jnp.swapaxes(m, 1, 2)                        # [P, M, N], M >= N
    omega = jax.random.normal(key, (x.shape[0], x.shape[2], q), jnp.float32)
    basis = jnp.linalg.qr(jnp.matmul(x, omega, precision=hi))[0]
    for _ in range(niter):
        basis = jnp.linalg.qr(jnp.matmul(jnp.swapaxes(x, 1, 2), basis, precision=hi))[0]
        basis = jnp.linalg.qr(jnp.matmul(x, basis, precision=hi))[0]
    small = jnp.matmul(jnp.swapaxes(basis, 1, 2), x, precision=hi)    # [P, q, N]
    u, sv, vh = jnp.linalg.svd(small, full_matrices=False)
    u = jnp.matmul(basis, u, precision=hi)
    if tall:
        return u, sv, vh
    return jnp.swapaxes(vh, 1, 2), sv, jnp.swapaxes(u, 1, 2)


def pissa_init(params, *, niter: int | None = None, key: jax.Array | None = None):
    """PiSSA: A/B from the top-r SVD of ``w0``, ``w0 := w0 - s*a@b`` (PEFT ``"pissa"``).

    With ``w0 = U diag(S) Vh`` (our (in, out) layout, per stacked layer, I and O
    flattened): ``a = U[:, :r] * sqrt(S_r / s)``, ``b = sqrt(S_r / s)[:, None] * Vh[:r]``.
    PEFT computes the same factors from the torch weight ``W = w0.T`` (``lora_A = a.T``,
    ``lora_B = b.T``), singular vectors up to a common sign per pair. Computed in float32
    and cast back to each leaf's dtype, as PEFT does.

    ``niter=K``: PEFT's ``"pissa_niter_K"``, a randomized SVD with K power iterations
    (:func:`randomized_svd`; far faster on large weights, exact when ``w0`` has rank
    <= r); ``key`` seeds its Gaussian sketch (default ``jax.random.key(0)``).
    """
    if niter is not None:
        niter = checks.positive_int("pissa_init", "niter", niter, minimum=0)
        key = jax.random.key(0) if key is None else checks.prng_key("pissa_init", "key", key)
    elif key is not None:
        raise ValueError("pissa_init: key is only used with niter=K (the randomized SVD); "
                         "drop it or pass niter.")
    counter = iter(range(1 << 30))

    def one(w: LoraWeight):
        w0, S, I, O = _per_layer(w)
        k = None if key is None else jax.random.fold_in(key, next(counter))
        a, b = svd_factors(w0, w.rank, w.scale, niter=niter, key=k)
        res = w0 - w.scale * jnp.einsum("pir,pro->pio", a, b, precision=lax.Precision.HIGHEST)
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


def pissa_to_lora(trained, initial):
    """A plain LoRA adapter over the ORIGINAL weights from a trained PiSSA/OLoRA one (PEFT's
    ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``).

    ``initial`` is the tree right after :func:`pissa_init`/:func:`olora_init`, ``trained``
    the same tree after training. With ``W = w0_res + s a0 @ b0`` the original weight
    and ``W + dW = w0_res + s a @ b`` the trained one, ``dW = s (a @ b - a0 @ b0)``, so
    each node becomes ``w0 = W`` (reformed in float32, cast to ``w0``'s dtype),
    ``a' = [a | a0]``, ``b' = [b; -b0]`` with rank ``2r`` and alpha ``2 alpha`` (rsLoRA:
    ``sqrt(2) alpha``), the scale unchanged, as PEFT writes it. A quantized ``w0`` is
    refused: ``Q(w0_res) + s a0 b0`` is not the original weight.
    """
    checks.tree("pissa_to_lora", "trained", trained)
    checks.tree("pissa_to_lora", "initial", initial)
    flat_i, tdef_i = jax.tree_util.tree_flatten_with_path(initial, is_leaf=is_lora_or_dora)
    flat_t, tdef_t = jax.tree_util.tree_flatten_with_path(trained, is_leaf=is_lora_or_dora)
    if tdef_i != tdef_t:
        raise ValueError("pissa_to_lora: trained and initial have different tree structures; "
                         "pass the tree saved right after pissa_init/olora_init of the same "
                         "model.")
    leaves = iter(leaf for _, leaf in flat_i if isinstance(leaf, LoraWeight))

    def one(w: LoraWeight):
        w0 = next(leaves)
        if w0.a.shape != w.a.shape or w0.b.shape != w.b.shape or w0.scale != w.scale:
            raise ValueError("its node in initial differs (rank, shape or scale); pass the "
                             "tree saved right after pissa_init/olora_init.")
        _per_layer(w0)                               # a float, finite residual base
        f32 = {k: getattr(w0, k).astype(jnp.float32) for k in ("w0", "a", "b")}
        orig = dataclasses.replace(w0, **f32).materialize().astype(w.w0.dtype)
        a = jnp.concatenate([w.a, w0.a.astype(w.a.dtype)], axis=-1)
        b = jnp.concatenate([w.b, -w0.b.astype(w.b.dtype)], axis=w.stack_ndim)
        alpha = w.alpha * (math.sqrt(2.0) if w.rslora else 2.0)
        return dataclasses.replace(w, w0=orig, a=a, b=b, alpha=alpha)
    for (kp, x), (_, y) in zip(flat_t, flat_i):
        if isinstance(x, LoraWeight) != isinstance(y, LoraWeight):
            raise ValueError(f"pissa_to_lora: leaf {path_str(kp)!r} is a LoraWeight in only "
                             "one of trained / initial.")
    return _map_init(trained, one, "pissa_to_lora")

