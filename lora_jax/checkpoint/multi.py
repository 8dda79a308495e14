"""Checkpoints of a stacked many-adapter tree (``MultiLoraWeight``): one per tree or per name.

A stacked tree is saved as the plain tree ``{name: unstack_adapter(params, name)}``
(one atomic commit) or, with ``separate=True``, as one checkpoint root per adapter
under ``directory/<name>/``, each of which ``restore_adapter`` loads on its own.

Example:
    >>> save_adapters(ckpt, stacked, step=1, separate=True)            # doctest: +SKIP
    >>> stacked = restore_adapters(ckpt, stacked, separate=True)       # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from lora_jax.checkpoint.restore import restore_adapter
from lora_jax.checkpoint.save import save_adapter
from lora_jax.variants import adapter_names, set_adapter, unstack_adapter

__all__ = ["restore_adapters", "save_adapters"]


def _unstacked(params) -> dict:
    return {n: unstack_adapter(params, n) for n in adapter_names(params)}


def save_adapters(directory, params, *, step: int, separate: bool = False, **kwargs):
    """Save every adapter of a stacked tree with ``save_adapter``.

    ``kwargs`` go to ``save_adapter`` (``metadata``, ``keep``, ``opt_state``); the
    metadata gets ``"adapters"``: the names. Returns the step path, or
    ``{name: step path}`` with ``separate=True``.
    """
    ad = _unstacked(params)
    meta = {**(kwargs.pop("metadata", None) or {}), "adapters": list(ad)}
    if not separate:
        return save_adapter(directory, ad, step=step, metadata=meta, **kwargs)
    root = Path(os.fspath(directory))
    return {n: save_adapter(root / n, t, step=step, metadata=meta, **kwargs) for n, t in ad.items()}


def _restore_each(root: Path, ad: dict, names: list[str], step, kwargs) -> dict:
    out = {}
    for n in names:
        if not (root / n).is_dir():
            raise FileNotFoundError(f"restore_adapters: no checkpoint for adapter {n!r} at "
                                    f"{root / n}.")
        out[n] = restore_adapter(root / n, ad[n], step=step, **kwargs)
    return out


def restore_adapters(directory, params, *, step: int | None = None, separate: bool = False,
                     names: Sequence[str] | None = None, **kwargs):
    """Inverse of :func:`save_adapters`.

    ``params`` is the stacked template (same names, ranks and base); returns it with
    the adapters' A/B restored (its padded ranks and row ids kept). ``separate=True``
    restores ``directory/<name>/`` for each of ``names`` (default: all the template's);
    the others keep the template's factors. ``kwargs`` go to ``restore_adapter``.
    """
    ad = _unstacked(params)
    unknown = [n for n in (names or ()) if n not in ad]
    if unknown:
        raise ValueError(f"restore_adapters: unknown adapter(s) {unknown}; the template "
                         f"holds {list(ad)}.")
    if separate:
        use = list(ad) if names is None else list(names)
        restored = _restore_each(Path(os.fspath(directory)), ad, use, step, kwargs)
    else:
        restored = restore_adapter(directory, ad, step=step, **kwargs)
    for n in ad:
        if n in restored:
            params = set_adapter(params, n, restored[n])
    return params
