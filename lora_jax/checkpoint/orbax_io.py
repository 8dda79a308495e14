"""The orbax side of a checkpoint root: its items, its steps, saving and restoring trees.

One ``CheckpointManager`` per call, synchronous, OCDBT off (one zarr directory per
array, so an error can name the files), three items per step::

    <root>/<step>/adapter/<key>/     one zarr array per adapter leaf
    <root>/<step>/opt_state/<key>/   optimizer-state leaves (when saved)
    <root>/<step>/lora_meta/metadata the JSON metadata

orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it to ``<step>`` when every
item is written. Which steps are complete, and pruning to ``keep``, is
:mod:`lora_jax.checkpoint.steps`.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import jax
import numpy as np

__all__ = ["ADAPTER", "META", "META_FILE", "OPT", "TRASH", "read_zarr", "restore_tree",
           "root_dir", "save_step"]

ADAPTER, OPT, META = "adapter", "opt_state", "lora_meta"
META_FILE = "metadata"  # orbax JsonCheckpointHandler's default file name
TRASH = ".deleted"


def _ocp():
    # Imported on first use: orbax adds about a second to `import lora_jax`, and only
    # checkpoint calls need it.
    import orbax.checkpoint as ocp
    return ocp


@contextlib.contextmanager
def quiet_orbax():
    """orbax logs absl WARNINGs on every non-OCDBT save / read-only open; silence them
    (and only them) for the duration of our own orbax calls."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # orbax/tensorstore deprecation chatter we cannot change, narrowly.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"orbax\..*")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"orbax\..*")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


@contextlib.contextmanager
def drop_orbax_unraisable():
    """A failed orbax read abandons its sibling read coroutines; when they are collected
    Python reports "Exception ignored in <coroutine ...>" through sys.unraisablehook.
    On our error path only, collect them here and drop just those reports."""
    prev = sys.unraisablehook

    def hook(u):
        orbax_coro = (inspect.iscoroutine(u.object)
                      and "orbax" in getattr(getattr(u.object, "cr_code", None), "co_filename", ""))
        closed_loop = (isinstance(u.exc_value, RuntimeError)
                       and str(u.exc_value) == "Event loop is closed")
        if not (orbax_coro or closed_loop):
            prev(u)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = prev


@contextlib.contextmanager
def _manager(root: Path, *, read_only: bool = False):
    # max_to_keep stays None: orbax would prune whatever it takes for a step (a bare
    # directory named "7" included); lora_jax.checkpoint.steps prunes complete steps only.
    ocp = _ocp()
    kw = {} if read_only else {"todelete_subdir": TRASH, "cleanup_tmp_directories": True}
    with quiet_orbax():      # the options and handlers log too (read_only: a WARNING)
        opts = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=not read_only, read_only=read_only,
            enable_async_checkpointing=False, **kw)
        handlers = {ADAPTER: ocp.PyTreeCheckpointHandler(use_ocdbt=False),
                    OPT: ocp.PyTreeCheckpointHandler(use_ocdbt=False),
                    META: ocp.JsonCheckpointHandler()}
        mngr = ocp.CheckpointManager(root, options=opts, item_handlers=handlers)
        try:
            yield mngr
        finally:
            mngr.close()


def root_dir(directory) -> Path:
    root = Path(os.fspath(directory)).absolute()
    if root.is_file():
        raise NotADirectoryError(f"{root} is a file, not an adapter checkpoint directory.")
    if not root.is_dir():
        raise FileNotFoundError(f"no adapter checkpoint directory at {root}.")
    return root


def save_step(root: Path, step: int, trees: dict, meta: dict) -> Path:
    """Commit ``{item: {key: array}}`` and the JSON ``meta`` as ``root/step``."""
    ocp = _ocp()
    items = {name: ocp.args.PyTreeSave(tree) for name, tree in trees.items()}
    items[META] = ocp.args.JsonSave(meta)
    with _manager(root) as mngr:
        mngr.save(step, args=ocp.args.Composite(**items), force=True)
        mngr.wait_until_finished()
    shutil.rmtree(root / TRASH, ignore_errors=True)
    return root / str(step)


def _restore_args(ocp, x):
    if isinstance(x, jax.Array):
        return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.asarray(x).dtype)


def restore_tree(root: Path, step: int, item: str, templates: dict) -> dict:
    """``{key: array}`` of ``item``, each array placed like its template (sharding, dtype)."""
    ocp = _ocp()
    args = {k: _restore_args(ocp, v) for k, v in templates.items()}
    restore = ocp.args.PyTreeRestore(item=templates, restore_args=args)
    with _manager(root, read_only=True) as mngr:
        out = mngr.restore(step, args=ocp.args.Composite(**{item: restore}))
    return dict(out[item])


def read_zarr(array_dir: Path) -> tuple[np.ndarray | None, str | None]:
    """``(value, None)`` of one zarr array read directly with tensorstore, or ``(None, error)``."""
    import tensorstore as ts
    try:
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(array_dir)}}
        return np.asarray(ts.open(spec, open=True, read=True).result().read().result()), None
    except Exception as e:  # noqa: BLE001 - the caller reports it with the file name
        return None, f"{type(e).__name__}: {str(e)[:300]}"
