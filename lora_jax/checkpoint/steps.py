"""Which steps of a checkpoint root are complete, what else a root may hold, and pruning.

A step ``<root>/<step>`` is complete when its metadata parses and passes its sha256
and every array it lists has its directory. Anything else named like a step (a bare
directory, a step whose metadata was deleted or damaged) is not offered by
:func:`adapter_steps`, is passed over by ``restore_adapter(step=None)`` (a note on the
``lora_jax.checkpoint`` logger at INFO level names it), and is never deleted: ``keep``
prunes complete steps only, by renaming them into ``<root>/.deleted`` (atomic) and only
then deleting them, so a killed process never leaves a half-deleted step.

Example:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> (root / "12").mkdir()                       # named like a step, holds nothing
    >>> adapter_steps(root), list(scan_steps(root)[1])
    ([], [12])
    >>> import shutil; shutil.rmtree(root)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import jax

from lora_jax.checkpoint.errors import CheckpointIntegrityError, limit
from lora_jax.checkpoint.meta import load_meta
from lora_jax.checkpoint.orbax_io import TRASH, root_dir

__all__ = ["adapter_steps", "check_root", "prune", "read_adapter_metadata", "resolve_step",
           "scan_steps", "set_aside"]

log = logging.getLogger("lora_jax.checkpoint")

_STEP = re.compile(r"^(0|[1-9][0-9]*)$")
_ORBAX_TMP = re.compile(r"^[0-9]+\.orbax-checkpoint-tmp")


def _problem(root: Path, step: int) -> str | None:
    """Why ``root/step`` is not a complete step, or None."""
    try:
        meta = load_meta(root, step)
    except ValueError as e:        # CheckpointIntegrityError, or a newer format_version
        return str(e)
    for item, table in (meta.get("arrays") or {}).items():
        d = root / str(step) / item
        missing = [k for k in (table or {}) if not (d / k).is_dir()]
        if missing:
            return f"{d} lacks the array directories {limit(missing, 5)}"
    return None


def scan_steps(root: Path) -> tuple[list[int], dict[int, str]]:
    """``(complete steps ascending, {incomplete step: why})`` of a checkpoint root."""
    complete, skipped = [], {}
    for p in root.iterdir():
        if _STEP.match(p.name) and p.is_dir():
            why = _problem(root, int(p.name))
            if why is None:
                complete.append(int(p.name))
            else:
                skipped[int(p.name)] = why.rstrip(".")
    return sorted(complete), dict(sorted(skipped.items()))


def adapter_steps(directory) -> list[int]:
    """The complete steps in ``directory``, ascending: not temporary directories left by
    an interrupted save, nor directories named like a step that are not complete."""
    return scan_steps(root_dir(directory))[0]


def resolve_step(root: Path, step: int | None) -> int:
    """``step`` if it is complete in ``root``; None: the latest complete step.

    A missing step is a ``FileNotFoundError``, an incomplete one a
    :class:`CheckpointIntegrityError` naming its directory; both list the complete steps.
    """
    complete, skipped = scan_steps(root)
    if step is None:
        if not complete and skipped:
            raise CheckpointIntegrityError(
                f"no complete adapter checkpoint in {root}; the steps there are damaged: "
                + limit([f"step {s}: {why}" for s, why in reversed(skipped.items())], 3))
        if not complete:
            partial = sorted(p.name for p in root.iterdir() if "tmp" in p.name)
            hint = f" (only interrupted saves: {partial})" if partial else ""
            raise FileNotFoundError(f"no complete adapter checkpoint in {root}{hint}.")
        for s in (s for s in skipped if s > complete[-1]):
            log.info("checkpoint %s: passing over incomplete step %d: %s", root, s, skipped[s])
        return complete[-1]
    step = int(step)
    if step in skipped:
        raise CheckpointIntegrityError(
            f"step {step} in {root} is not a complete checkpoint: {skipped[step]}. "
            f"Complete steps: {complete}.")
    if step not in complete:
        raise FileNotFoundError(
            f"step {step} is not a complete checkpoint in {root}; available steps: {complete}.")
    return step


def read_adapter_metadata(directory, step: int | None = None) -> dict:
    """The JSON metadata of ``step`` (default: the latest complete one); ``["user"]`` is
    what was passed as ``metadata=``."""
    root = root_dir(directory)
    return load_meta(root, resolve_step(root, step))


def _foreign(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()
                  if not ((_STEP.match(p.name) or _ORBAX_TMP.match(p.name)) and p.is_dir())
                  and p.name != TRASH)


def check_root(root: Path, step: int, overwrite: bool) -> None:
    """Refuse, before anything is written, a checkpoint root that holds foreign files
    (unless ``overwrite``: they are then left untouched) or already holds ``step``
    (unless ``overwrite``: it is then replaced once the new one is committed)."""
    if not root.is_dir() or overwrite:
        return
    foreign = _foreign(root)
    if foreign:
        raise FileExistsError(
            f"save_adapter: {root} holds entries that are not adapter checkpoint steps "
            f"({limit(foreign, 8)}); nothing was written. Pass a new or empty directory, or "
            "overwrite=True to save next to them (they are never modified or deleted).")
    if (root / str(step)).exists():
        raise FileExistsError(f"save_adapter: step {step} already exists in {root}; pass "
                              "overwrite=True to replace it.")


def set_aside(root: Path, step: int) -> Path | None:
    """Move an existing ``root/step`` into ``root/.deleted`` (atomic); its new path."""
    src = root / str(step)
    if not (src.exists() or src.is_symlink()):
        return None
    (root / TRASH).mkdir(exist_ok=True)
    dst = root / TRASH / f"{step}-{uuid.uuid4().hex[:8]}"
    os.replace(src, dst)
    return dst


def prune(root: Path, keep: int | None) -> None:
    """Delete the oldest complete steps beyond the newest ``keep`` (None: keep all).
    Only the primary process deletes (every process of a multi-process save calls this)."""
    if jax.process_index() != 0:
        return
    complete, _ = scan_steps(root)
    if keep is not None:
        for s in complete[:-keep]:
            set_aside(root, s)
    shutil.rmtree(root / TRASH, ignore_errors=True)
