"""``restore_adapter``: load a checkpoint step onto a template, verified end to end.

Before any array is read, the template's adapter and quantization configs and its base
fingerprint are compared with the saved ones (:class:`BaseMismatchError` lists every
difference). Each array's files are then read directly with tensorstore and their
sha256 checked, so a truncated or bit-flipped file is named before orbax touches it;
orbax then restores onto the template's shardings and the arrived values are hashed
again.

Example:
    >>> params = restore_adapter(ckpt, params)                          # doctest: +SKIP
    >>> params, opt_state = restore_adapter(ckpt, params, opt_state=opt_state)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from lora_jax.checkpoint.arrays import dtype_name, flat, host, sha256_array
from lora_jax.checkpoint.config import compare_config, lora_config, quant_config
from lora_jax.checkpoint.errors import BaseMismatchError, CheckpointIntegrityError, limit, one_sided
from lora_jax.checkpoint.fingerprint import base_fingerprint, compare_base
from lora_jax.checkpoint.meta import load_meta
from lora_jax.checkpoint.orbax_io import (
    ADAPTER,
    OPT,
    drop_orbax_unraisable,
    read_zarr,
    restore_tree,
    root_dir,
)
from lora_jax.checkpoint.steps import resolve_step
from lora_jax.lora import combine, split

__all__ = ["restore_adapter"]


def _array_files(item_dir: Path, key: str) -> str:
    d = item_dir / key
    if not d.is_dir():
        return f"{d} (missing)"
    files = sorted(p.name for p in d.iterdir() if p.is_file())
    return f"{d}/{{{', '.join(files)}}}"


def _verify_files(item_dir: Path, keys, table: dict) -> None:
    """Every array directory exists, reads, and hashes to its recorded sha256."""
    if not item_dir.is_dir():
        raise CheckpointIntegrityError(f"checkpoint item directory {item_dir} is missing.")
    for k in keys:
        if not (item_dir / k).is_dir():
            raise CheckpointIntegrityError(
                f"array {table[k]['path']!r}: its directory {item_dir / k} is missing.")
    bad = []
    for k in keys:
        data, err = read_zarr(item_dir / k)
        if err is not None:
            bad.append(f"array {table[k]['path']!r} in {_array_files(item_dir, k)} is truncated "
                       f"or corrupted: {err}")
        elif table[k].get("sha256") is not None and sha256_array(data) != table[k]["sha256"]:
            bad.append(f"array {table[k]['path']!r} fails its sha256 check: the file(s) "
                       f"{_array_files(item_dir, k)} are corrupted (bit flip or edit)")
    if bad:
        raise CheckpointIntegrityError(f"checkpoint {item_dir}: " + limit(bad, 5))


def _restore_item(root: Path, step: int, item: str, templates: dict, table: dict) -> dict:
    """``{key: array}`` of one item on the templates' shardings, verified before and after."""
    item_dir = root / str(step) / item
    _verify_files(item_dir, list(templates), table)
    with drop_orbax_unraisable():
        try:
            restored, failure = restore_tree(root, step, item, templates), None
        except Exception as e:  # noqa: BLE001 - re-raised below, outside the hook
            restored, failure = None, e
    if failure is not None:
        raise CheckpointIntegrityError(
            f"checkpoint {item_dir} could not be read: {type(failure).__name__}: "
            f"{str(failure)[:800]}") from failure
    for k, x in restored.items():
        expected = table[k].get("sha256")
        h = None if expected is None else host(x)
        if h is not None and sha256_array(h) != expected:
            raise CheckpointIntegrityError(
                f"array {table[k]['path']!r} changed while restoring from "
                f"{_array_files(item_dir, k)} (sha256 mismatch).")
    return restored


def _match_templates(leaves: list[tuple[str, Any]], table: dict, what: str) -> dict:
    """``{orbax key: template leaf}``, checking paths, shapes and dtypes against the table."""
    by_path = {v["path"]: k for k, v in table.items()}
    problems = one_sided(by_path, [p for p, _ in leaves], f"{what} leaves", "the template")
    templates = {}
    for path, x in leaves:
        if path not in by_path:
            continue
        row = table[by_path[path]]
        x = x if hasattr(x, "shape") else np.asarray(x)
        shape, dtype = [int(d) for d in x.shape], dtype_name(x)
        if shape != row["shape"] or dtype != row["dtype"]:
            problems.append(f"{what} leaf {path}: checkpoint {tuple(row['shape'])} "
                            f"{row['dtype']}, template {tuple(shape)} {dtype}")
        templates[by_path[path]] = x
    if problems:
        raise ValueError("restore_adapter: " + "\n  ".join(problems))
    return templates


def _restore_like(root: Path, step: int, item: str, template, table: dict, what: str):
    """``template`` (a tree) with every leaf replaced by the restored array."""
    treedef = jax.tree_util.tree_structure(template)
    named = flat(template)
    restored = _restore_item(root, step, item, _match_templates(named, table, what), table)
    by_path = {v["path"]: k for k, v in table.items()}
    return jax.tree_util.tree_unflatten(treedef, [restored[by_path[p]] for p, _ in named])


def _check_base(meta: dict, params, allow_different_base: bool, where: Path) -> None:
    problems = compare_config(meta["lora"], lora_config(params), "LoRA leaves")
    problems += compare_config(meta.get("quantization", {}), quant_config(params),
                               "quantized base leaves")
    problems += compare_base(meta["base"], base_fingerprint(params), allow_different_base)
    if problems:
        raise BaseMismatchError(
            f"restore_adapter: checkpoint {where} was saved for another base:\n  "
            + "\n  ".join(problems))


def restore_adapter(directory, params, *, step: int | None = None, opt_state=None,
                    allow_different_base: bool = False):
    """Load the trainable leaves of checkpoint ``step`` (default: latest complete) into ``params``.

    ``params`` is the template: the base model lorafied the same way as when saving
    (same targets/rank/alpha); its A/B leaves only give shapes, dtypes and shardings
    (restored arrays get each template leaf's ``.sharding``). Its frozen leaves are
    checked against the saved base fingerprint.

    Returns ``params`` with A/B replaced, or ``(params, opt_state)`` when an
    ``opt_state`` template is given (e.g. ``tx.init(params)``; its leaves' shardings
    are used too).

    Raises:
      FileNotFoundError: no such directory, or no such complete step.
      BaseMismatchError (a ValueError): other tree / shapes / dtypes / LoRA config, or
        other weights unless ``allow_different_base=True``; the message lists the paths.
      CheckpointIntegrityError (a ValueError): a missing, truncated or corrupted file
        (named in the message), or an array whose sha256 does not match.
    """
    root = root_dir(directory)
    step = resolve_step(root, step)
    meta = load_meta(root, step)
    _check_base(meta, params, allow_different_base, root / str(step))
    trainable, frozen = split(params)
    tables = meta["arrays"]
    new_params = combine(_restore_like(root, step, ADAPTER, trainable, tables[ADAPTER],
                                       "adapter"), frozen)
    if opt_state is None:
        return new_params
    if tables.get(OPT) is None:
        raise ValueError(f"restore_adapter: checkpoint {root / str(step)} holds no optimizer "
                         "state (it was saved without opt_state=).")
    return new_params, _restore_like(root, step, OPT, opt_state, tables[OPT], "opt_state")
