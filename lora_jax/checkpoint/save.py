"""``save_adapter``: what training changed, as one atomic orbax step.

A LoRA checkpoint holds the trainable leaves (``split(params)[0]``: A/B, DoRA's
magnitude...) and, optionally, the optimizer state (for
``optax.masked(tx, trainable_mask(params))`` over the full tree that is the A/B moments
and the step counts: whatever leaves the state has are saved). The frozen base is not
written; its fingerprint is, so that a restore onto the wrong base is refused.
Nothing is pickled: arrays are zarr/tensorstore, metadata is JSON.

Example:
    >>> save_adapter(ckpt, params, step=100, opt_state=opt_state)      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from lora_jax.checkpoint.arrays import array_table, flat
from lora_jax.checkpoint.atomic import check_destination
from lora_jax.checkpoint.config import lora_config, quant_config
from lora_jax.checkpoint.fingerprint import base_fingerprint
from lora_jax.checkpoint.meta import make_meta
from lora_jax.checkpoint.orbax_io import ADAPTER, OPT, save_step
from lora_jax.checkpoint.steps import check_root, prune, set_aside
from lora_jax.lora import split

__all__ = ["save_adapter"]


def _check_args(step, keep, metadata) -> tuple[int, dict]:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}.")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be a positive int or None, got {keep!r}.")
    user = dict(metadata or {})
    try:
        json.dumps(user)
    except TypeError as e:
        raise TypeError(f"save_adapter: metadata must be JSON-serializable ({e}).") from None
    return int(step), user


def save_adapter(directory, params, *, step: int, opt_state=None,
                 metadata: Mapping[str, Any] | None = None, keep: int | None = 3,
                 overwrite: bool = False) -> str:
    """Write the trainable leaves of ``params`` (and ``opt_state``) as checkpoint ``step``.

    Args:
      directory: the checkpoint root (created if missing); steps are its subdirectories.
      params: the LoRA'd parameter tree (``lorafy(...)``, possibly over a quantized base).
      step: a non-negative int not already saved in ``directory``.
      opt_state: optional optimizer state; all its array leaves are saved.
      metadata: JSON-serializable user metadata, returned by ``read_adapter_metadata``.
      keep: how many most recent complete steps to keep (``None``: all). Only complete
        steps this library wrote are ever deleted.
      overwrite: replace an existing ``step`` (once the new one is committed), and save
        into a directory that also holds other files (they are left untouched).
        Without it both are refused (``FileExistsError``) before anything is written.

    Returns the path of the committed step directory. Synchronous: when it returns,
    the checkpoint is on disk and complete. A file at ``directory`` is refused
    (``NotADirectoryError``).
    """
    step, user = _check_args(step, keep, metadata)
    lora = lora_config(params)
    if not lora:
        raise ValueError("save_adapter: params holds no adapter (LoraWeight, ...); "
                         "lorafy() it first.")
    root = check_destination(directory, what="save_adapter", overwrite=True)
    check_root(root, step, overwrite)

    trees, tables = {}, {}
    trees[ADAPTER], tables[ADAPTER] = array_table(flat(split(params)[0]))
    tables[OPT] = None
    if opt_state is not None:
        trees[OPT], tables[OPT] = array_table(flat(opt_state))
    meta = make_meta(step=step, lora=lora, quantization=quant_config(params),
                     base=base_fingerprint(params), arrays=tables, user=user)
    if overwrite and (root / str(step)).exists() and jax.process_count() > 1:
        raise ValueError(f"save_adapter: replacing the existing step {step} in {root} "
                         "(overwrite=True) is not supported in a multi-process save; "
                         "save another step.")
    old = set_aside(root, step) if root.is_dir() else None
    try:
        out = save_step(root, step, trees, meta)
    except BaseException:
        if old is not None and not (root / str(step)).exists():
            os.replace(old, root / str(step))
        raise
    prune(root, keep)
    return str(out)
