"""Task-vector merging (PEFT ``peft.utils.merge_utils``): TIES, DARE, magnitude pruning.

Each function takes ``n`` task tensors stacked as ``t [n, P, ...]`` (P independent
layers: pruning and top-k run per layer, as PEFT runs them per module) and weights
``[n]``, and returns the merged ``[P, ...]``:

* ``linear``: ``sum_i w_i t_i``;
* ``magnitude_prune``: keep the ``int(density * size)`` largest ``|t_i|`` of each layer,
  then ``linear``;
* ``ties``: magnitude pruning, a majority sign per element (``"total"``: the sign of
  ``sum_i t_i``; ``"frequency"``: of ``sum_i sign(t_i)``; 0 counts as +), then the mean of
  the weighted values that agree with it (disjoint merge);
* ``dare_linear`` / ``dare_ties``: keep each element with probability ``density`` and
  divide by it (random pruning), then ``linear`` / TIES' sign election and disjoint merge.

``density >= 1`` prunes nothing (as PEFT). DARE's masks are
``jax.random.bernoulli(k_i, density, t_i.shape)`` with ``k_i = jax.random.split(key, n)[i]``,
or given as ``masks [n, P, ...]``.

Example:
    >>> import jax.numpy as jnp
    >>> t = jnp.array([[[3.0, -1.0, 0.5]], [[-2.0, -4.0, 0.25]]])      # n=2, P=1
    >>> merge_task_tensors(t, jnp.array([1.0, 1.0]), "ties", density=1.0).tolist()
    [[3.0, -2.5, 0.375]]
    >>> merge_task_tensors(t, jnp.array([1.0, 1.0]), "magnitude_prune", density=0.34).tolist()
    [[3.0, -4.0, 0.0]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["COMBINATIONS", "merge_task_tensors"]

#: combination types that take ``density`` (the non-SVD ones; each also has a ``*_svd`` form)
COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")


def _magnitude_prune(t, density: float):
    """Zero all but the ``int(density * size)`` largest magnitudes of each ``t[i, p]``."""
    n, p = t.shape[:2]
    flat = t.reshape(n, p, -1)
    k = int(density * flat.shape[-1])
    if k == 0:
        return jnp.zeros_like(t)
    _, idx = lax.top_k(jnp.abs(flat), k)
    keep = jnp.zeros(flat.shape, jnp.bool_)
    keep = jax.vmap(jax.vmap(lambda m, i: m.at[i].set(True)))(keep, idx)
    return jnp.where(keep, flat, jnp.zeros_like(flat)).reshape(t.shape)


def _majority_mask(t, method: str):
    sign = jnp.sign(t)
    votes = t.sum(axis=0) if method == "total" else sign.sum(axis=0)
    majority = jnp.where(votes >= 0, jnp.ones_like(votes), -jnp.ones_like(votes))
    return sign == majority[None]


def _weighted(t, weights):
    return t * weights.astype(t.dtype).reshape((-1,) + (1,) * (t.ndim - 1))


def merge_task_tensors(t, weights, combination_type: str, *, density: float | None = None,
                       majority_sign_method: str = "total", key=None, masks=None):
    """Merge ``t [n, P, ...]`` with ``weights [n]`` (see the module docstring)."""
    prune = density is not None and density < 1
    if combination_type in ("ties", "magnitude_prune") and prune:
        t = _magnitude_prune(t, density)
    elif combination_type.startswith("dare") and prune:
        if masks is None:
            keys = jax.random.split(key, t.shape[0])
            masks = jnp.stack([jax.random.bernoulli(k, density, t.shape[1:]) for k in keys])
        t = jnp.where(masks.astype(jnp.bool_), t, jnp.zeros_like(t)) / jnp.asarray(
            density, t.dtype)
    if combination_type in ("ties", "dare_ties"):
        mask = _majority_mask(t, majority_sign_method)
        kept = jnp.where(mask, _weighted(t, weights), jnp.zeros_like(t)).sum(axis=0)
        return kept / jnp.maximum(mask.sum(axis=0).astype(t.dtype), jnp.ones((), t.dtype))
    return _weighted(t, weights).sum(axis=0)
