"""Adapter-only checkpoints on orbax, base fingerprints, and merged exports.

A LoRA checkpoint holds what training changes and nothing else: the A/B leaves
(``split(params)[0]``) and, optionally, the optimizer state (for
``optax.masked(tx, trainable_mask(params))`` over the full tree that is the A/B
moments and the step counts: whatever leaves the state has are saved). The
frozen base is *not* written; it is described by a fingerprint so that a
restore onto the wrong base is refused.

Layout of ``directory`` (one orbax ``CheckpointManager``)::

    directory/<step>/adapter/<dotted.path>/   one zarr array per A/B leaf (no OCDBT,
                                              so every array has its own files)
    directory/<step>/opt_state/<dotted.path>/ optimizer-state leaves (when given)
    directory/<step>/lora_meta/metadata       JSON: see below

Saves are atomic: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it
to ``<step>`` when every item is written, so a process killed mid-save leaves
only a temporary directory, which is never offered as a step. ``keep`` old
steps are kept (``CheckpointManagerOptions(max_to_keep=keep)``).

The JSON metadata (``lora_meta/metadata``, written in the same atomic commit):

* ``lora``: per LoRA leaf path ``{rank, alpha, rslora, in_ndim, a_shape, b_shape, dtype}``;
  ``targets``: the LoRA leaf paths; ``quantization``: per quantized base leaf its
  node type, shape, dtype and static fields (e.g. kind/block_size);
* ``base``: the fingerprint of the frozen base (see :func:`base_fingerprint`);
* ``arrays``: per saved array its tree path, shape, dtype and the sha256 of its
  bytes. orbax/tensorstore do not checksum array data, so a flipped byte in an
  uncompressed chunk would load silently; every restored array is hashed and
  compared, and a mismatch raises :class:`CheckpointIntegrityError` naming the
  array's files. The metadata carries its own sha256 too (``meta_sha256``).
* ``user``: the ``metadata=`` dict given to :func:`save_adapter`;
  ``library_version``, ``jax_version``, ``orbax_version``, ``step``.

Nothing is ever unpickled: arrays are zarr/tensorstore, metadata is JSON.

Example:
    >>> save_adapter(ckpt, params, step=100, opt_state=opt_state)      # doctest: +SKIP
    >>> params = restore_adapter(ckpt, params)                          # doctest: +SKIP
    >>> params, opt_state = restore_adapter(ckpt, params, opt_state=opt_state)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.core.tree import path_str
from lora_jax.lora.lorafy import merge
from lora_jax.core.implicit import ImplicitArray, is_implicit
from lora_jax.lora.weight import is_adapter
from lora_jax.lora.train import combine, split

__all__ = [
    "BaseMismatchError",
    "CheckpointIntegrityError",
    "adapter_bytes",
    "adapter_steps",
    "base_fingerprint",
    "export_merged",
    "model_bytes",
    "read_adapter_metadata",
    "restore_adapter",
    "save_adapter",
]

FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1
_ADAPTER, _OPT, _META = "adapter", "opt_state", "lora_meta"
_META_FILE = "metadata"  # orbax JsonCheckpointHandler's default file name
# Steps beyond ``keep`` are first *renamed* here by orbax (atomic), then deleted by us:
# a process killed while deleting never leaves a half-deleted directory named as a step.
_TRASH = ".deleted"

# Fingerprint: leaves with at most this many elements are hashed whole; larger
# ones by _N_SAMPLES elements at evenly spaced flat indices (first and last included).
_FULL_HASH_MAX = 1 << 16
_N_SAMPLES = 1024


class BaseMismatchError(ValueError):
    """The params given to :func:`restore_adapter` are not the base the adapter was trained on."""


class CheckpointIntegrityError(ValueError):
    """A checkpoint file is missing, truncated or corrupted (the message names it)."""


# --------------------------------------------------------------------------------------
# bytes
# --------------------------------------------------------------------------------------


def _nbytes(x) -> int:
    if x is None:
        return 0
    if hasattr(x, "shape") and hasattr(x, "dtype"):   # arrays and jax.ShapeDtypeStruct
        return math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return int(np.asarray(x).nbytes)


def adapter_bytes(params) -> int:
    """Bytes of the trainable LoRA leaves (A and B of every :class:`LoraWeight`).

    Works on abstract trees too (``jax.eval_shape(lambda p: lorafy(p, ...), shapes)``),
    so the size of a 7B adapter can be computed without allocating the model."""
    trainable, _ = split(params)
    return sum(_nbytes(x) for x in jax.tree.leaves(trainable))


def model_bytes(params) -> int:
    """Bytes of every array leaf as stored (a quantized base counts its packed codes and
    scales, not its dequantized size), adapter included."""
    return sum(_nbytes(x) for x in jax.tree.leaves(params))


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_orbax():
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
def _drop_orbax_unraisable():
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


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


def _manager(directory: Path, *, keep: int | None = None, read_only: bool = False):
    ocp = _ocp()
    kw = {} if read_only else {"todelete_subdir": _TRASH, "cleanup_tmp_directories": True}
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False, **kw)
    handlers = {
        _ADAPTER: ocp.PyTreeCheckpointHandler(use_ocdbt=False),
        _OPT: ocp.PyTreeCheckpointHandler(use_ocdbt=False),
        _META: ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(directory, options=opts, item_handlers=handlers)


def _flat(tree, is_leaf=None):
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(p), x) for p, x in flat], treedef


def _keys_for(paths: list[str]) -> list[str]:
    """File-system-safe, unique orbax keys: the dotted path (index-prefixed on collision)."""
    keys = [re.sub(r"[^A-Za-z0-9_-]+", ".", p).strip(".") or "leaf" for p in paths]
    if len(set(keys)) != len(keys):
        keys = [f"{i:05d}.{k}" for i, k in enumerate(keys)]
    return keys


def _host(x) -> np.ndarray | None:
    """The value on this host, or None for an array spread over other processes."""
    if isinstance(x, jax.Array):
        if not x.is_fully_addressable:
            return None
        return np.asarray(jax.device_get(x))
    return np.asarray(x)


def _sha256_array(x: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{x.dtype.str}|{x.shape}|".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _dtype_name(x) -> str:
    return str(np.dtype(x.dtype)) if hasattr(x, "dtype") else type(x).__name__


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------------------
# base fingerprint
# --------------------------------------------------------------------------------------


def _samples(x, shape: tuple[int, ...]) -> np.ndarray | None:
    """Elements of ``x`` at evenly spaced flat indices, gathered shard by shard (only
    the samples cross to the host; never the whole array)."""
    size = math.prod(shape)
    flat_idx = np.unique(np.linspace(0, size - 1, _N_SAMPLES).round().astype(np.int64))
    nd = np.unravel_index(flat_idx, shape)
    if not isinstance(x, jax.Array):
        return np.asarray(x)[nd]
    out = np.empty(len(flat_idx), dtype=np.dtype(x.dtype))
    filled = np.zeros(len(flat_idx), dtype=bool)
    for shard in x.addressable_shards:
        bounds = [sl.indices(dim)[:2] for sl, dim in zip(shard.index, shape)]
        inside = ~filled
        for (lo, hi), ix in zip(bounds, nd):
            inside &= (ix >= lo) & (ix < hi)
        if not inside.any():
            continue
        local = tuple(np.asarray(ix[inside] - lo, np.int32) for (lo, _), ix in zip(bounds, nd))
        out[inside] = np.asarray(jax.device_get(shard.data[local]))
        filled |= inside
    if not filled.all():
        return None  # part of the array lives on other processes
    return out


def _leaf_fingerprint(x) -> dict:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        return {"shape": None, "dtype": type(x).__name__, "content": repr(x)[:200]}
    shape = tuple(int(d) for d in x.shape)
    size = math.prod(shape)
    entry = {"shape": list(shape), "dtype": _dtype_name(x)}
    if size <= _FULL_HASH_MAX:
        host = _host(x)
        entry["sampled"] = False
        entry["content"] = None if host is None else _sha256_array(host)
    else:
        vals = _samples(x, shape)
        entry["sampled"] = True
        entry["content"] = None if vals is None else _sha256_array(vals)
    return entry


def base_fingerprint(params) -> dict:
    """Paths, shapes, dtypes and a cheap content hash of every frozen leaf of ``params``.

    Content hash (sha256): the whole array for leaves of at most 65,536 elements;
    otherwise 1,024 elements at evenly spaced flat indices (first and last included),
    gathered from each addressable shard so only the samples reach the host. That is
    independent of the sharding, costs a few KiB per leaf for a 7B base, and works on
    any array leaf (QuantizedWeight codes and scales included). It catches another
    checkpoint, another seed or another fine-tune of the same architecture; it is not
    meant to catch a handful of edited elements. ``content`` is None for an array not
    fully addressable from this process (multi-host): then only shapes are compared.
    """
    _, frozen = split(params)
    flat, _ = _flat(frozen)
    return {path: _leaf_fingerprint(x) for path, x in flat}


def _jsonable(v):
    if isinstance(v, (bool, int, float, str, type(None))):
        return v
    if isinstance(v, (np.integer, np.floating, np.bool_)):
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    try:
        return str(np.dtype(v))
    except TypeError:
        return repr(v)


def _static_fields(node) -> dict:
    return {f.name: _jsonable(getattr(node, f.name))
            for f in dataclasses.fields(node) if f.metadata.get("static")}


def _quant_config(params) -> dict:
    """Per quantized base leaf (a LoraWeight's w0 or a bare node): type, shape, static fields."""
    out = {}
    flat, _ = _flat(params, is_leaf=is_implicit)
    for path, x in flat:
        node, where = x, path
        if is_adapter(x):
            node, where = x.w0, f"{path}/w0"
        if isinstance(node, ImplicitArray) and dataclasses.is_dataclass(node):
            out[where] = {**_static_fields(node), "type": type(node).__name__,
                          "shape": [int(d) for d in node.shape],
                          "dtype": str(np.dtype(node.dtype))}
    return out


def _lora_config(params) -> dict:
    """Per adapter node (LoraWeight, DoraWeight, MultiLoraWeight...): its type, static
    fields (alpha, rslora, in_ndim, names...) and the shapes of its trainable fields."""
    out = {}
    flat, _ = _flat(params, is_leaf=is_adapter)
    for path, x in flat:
        if is_adapter(x):
            cfg = {"type": type(x).__name__, "rank": int(x.a.shape[-1]), **_static_fields(x),
                   "dtype": _dtype_name(x.a)}
            for f in type(x).trainable_fields:
                cfg[f"{f}_shape"] = [int(d) for d in getattr(x, f).shape]
            out[path] = cfg
    return out


def _limit(items: list[str], n: int = 12) -> str:
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def _compare_base(saved: dict, now: dict, allow_different_base: bool) -> list[str]:
    problems = []
    missing = sorted(set(saved) - set(now))
    extra = sorted(set(now) - set(saved))
    if missing:
        problems.append(f"base leaves in the checkpoint but not in params: {_limit(missing)}")
    if extra:
        problems.append(f"base leaves in params but not in the checkpoint: {_limit(extra)}")
    common = [p for p in saved if p in now]
    shapes = [f"{p}: saved {tuple(saved[p]['shape'] or ())}, params {tuple(now[p]['shape'] or ())}"
              for p in common if saved[p]["shape"] != now[p]["shape"]]
    if shapes:
        problems.append(f"base shapes differ: {_limit(shapes)}")
    dtypes = [f"{p}: saved {saved[p]['dtype']}, params {now[p]['dtype']}"
              for p in common if saved[p]["dtype"] != now[p]["dtype"]]
    if dtypes:
        problems.append(f"base dtypes differ: {_limit(dtypes)}")
    if not allow_different_base:
        content = [p for p in common
                   if saved[p]["shape"] == now[p]["shape"] and saved[p]["dtype"] == now[p]["dtype"]
                   and saved[p].get("content") is not None and now[p].get("content") is not None
                   and saved[p]["content"] != now[p]["content"]]
        if content:
            problems.append(
                f"base weights differ (same shapes and dtypes, other values) at {len(content)} of "
                f"{len(common)} leaves: {_limit(content)}. If this is intended (e.g. the same "
                "model re-downloaded in another precision path), pass allow_different_base=True")
    return problems


def _compare_config(saved: dict, now: dict, what: str) -> list[str]:
    problems = []
    missing = sorted(set(saved) - set(now))
    extra = sorted(set(now) - set(saved))
    if missing:
        problems.append(f"{what} in the checkpoint but not in params: {_limit(missing)}")
    if extra:
        problems.append(f"{what} in params but not in the checkpoint: {_limit(extra)}")
    diffs = []
    for p in saved:
        if p in now and saved[p] != now[p]:
            keys = sorted(k for k in set(saved[p]) | set(now[p]) if saved[p].get(k) != now[p].get(k))
            diffs.append(f"{p}: " + ", ".join(
                f"{k} saved {saved[p].get(k)!r} vs params {now[p].get(k)!r}" for k in keys))
    if diffs:
        problems.append(f"{what} differ: {_limit(diffs)}")
    return problems


# --------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------


def _array_table(flat: list[tuple[str, Any]]) -> tuple[dict, dict]:
    """({orbax key: array}, {orbax key: {path, shape, dtype, sha256}})."""
    paths = [p for p, _ in flat]
    keys = _keys_for(paths)
    tree, table = {}, {}
    for key, (path, x) in zip(keys, flat):
        if not hasattr(x, "shape"):
            x = np.asarray(x)
        host = _host(x)
        tree[key] = x
        table[key] = {"path": path, "shape": [int(d) for d in x.shape], "dtype": _dtype_name(x),
                      "sha256": None if host is None else _sha256_array(host)}
    return tree, table


def save_adapter(directory, params, *, step: int, opt_state=None,
                 metadata: Mapping[str, Any] | None = None, keep: int | None = 3) -> str:
    """Write the LoRA A/B leaves of ``params`` (and ``opt_state``) as checkpoint ``step``.

    Args:
      directory: the checkpoint root (created if missing); steps are its subdirectories.
      params: the LoRA'd parameter tree (``lorafy(...)``, possibly over a quantized base).
      step: a non-negative int not already saved in ``directory``.
      opt_state: optional optimizer state; all its array leaves are saved (for
        ``optax.masked(tx, trainable_mask(params))`` that is the A/B moments + counts).
      metadata: JSON-serializable user metadata, returned by :func:`read_adapter_metadata`.
      keep: how many most recent steps to keep (``None``: all).

    Returns the path of the committed step directory. Synchronous: when it returns,
    the checkpoint is on disk and complete.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}.")
    step = int(step)
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"keep must be a positive int or None, got {keep!r}.")
    lora_cfg = _lora_config(params)
    if not lora_cfg:
        raise ValueError("save_adapter: params holds no adapter (LoraWeight, ...); "
                         "lorafy() it first.")
    user = dict(metadata or {})
    try:
        json.dumps(user)
    except TypeError as e:
        raise TypeError(f"save_adapter: metadata must be JSON-serializable ({e}).") from None

    trainable, _ = split(params)
    flat_tr, _ = _flat(trainable)
    adapter_tree, adapter_table = _array_table(flat_tr)
    opt_tree, opt_table = None, None
    if opt_state is not None:
        flat_opt, _ = _flat(opt_state)
        opt_tree, opt_table = _array_table(flat_opt)

    import orbax.checkpoint as ocp
    import lora_jax

    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
        "library_version": getattr(lora_jax, "__version__", "unknown"),
        "jax_version": jax.__version__,
        "orbax_version": getattr(ocp, "__version__", "unknown"),
        "targets": list(lora_cfg), "lora": lora_cfg,
        "quantization": _quant_config(params),
        "base": base_fingerprint(params),
        "arrays": {_ADAPTER: adapter_table, _OPT: opt_table},
        "user": user,
        "fingerprint_scheme": {"full_hash_max_elements": _FULL_HASH_MAX,
                               "samples": _N_SAMPLES, "hash": "sha256"},
    }
    meta["meta_sha256"] = hashlib.sha256(_canonical(meta)).hexdigest()

    root = Path(os.fspath(directory)).absolute()
    if (root / str(step)).exists():
        raise FileExistsError(f"save_adapter: step {step} already exists in {root}.")
    items = {_ADAPTER: ocp.args.PyTreeSave(adapter_tree), _META: ocp.args.JsonSave(meta)}
    if opt_tree is not None:
        items[_OPT] = ocp.args.PyTreeSave(opt_tree)
    with _quiet_orbax():
        mngr = _manager(root, keep=keep)
        try:
            mngr.save(step, args=ocp.args.Composite(**items), force=True)
            mngr.wait_until_finished()
        finally:
            mngr.close()
    trash = root / _TRASH
    if trash.is_dir():
        shutil.rmtree(trash, ignore_errors=True)
    return str(root / str(step))


# --------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------


def _root(directory) -> Path:
    root = Path(os.fspath(directory)).absolute()
    if not root.is_dir():
        raise FileNotFoundError(f"no adapter checkpoint directory at {root}.")
    return root


def adapter_steps(directory) -> list[int]:
    """The complete (committed) steps in ``directory``, ascending. Temporary directories
    left by an interrupted save are not steps."""
    root = _root(directory)
    with _quiet_orbax():
        mngr = _manager(root, read_only=True)
        try:
            steps = sorted(int(s) for s in mngr.all_steps())
        finally:
            mngr.close()
    return steps


def _resolve_step(root: Path, step: int | None) -> int:
    steps = adapter_steps(root)
    if step is None:
        if not steps:
            partial = sorted(p.name for p in root.iterdir() if "tmp" in p.name)
            hint = f" (only interrupted saves: {partial})" if partial else ""
            raise FileNotFoundError(f"no complete adapter checkpoint in {root}{hint}.")
        return steps[-1]
    if int(step) not in steps:
        raise FileNotFoundError(
            f"step {step} is not a complete checkpoint in {root}; available steps: {steps}.")
    return int(step)


def _load_meta(root: Path, step: int) -> dict:
    f = root / str(step) / _META / _META_FILE
    try:
        raw = f.read_bytes()
    except FileNotFoundError:
        raise CheckpointIntegrityError(f"checkpoint metadata file {f} is missing.") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointIntegrityError(
            f"checkpoint metadata file {f} is truncated or corrupted ({e}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointIntegrityError(f"{f} is not a lora_jax adapter checkpoint metadata file.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{f} has format_version {meta.get('format_version')}; this lora_jax "
                         f"reads up to {FORMAT_VERSION}. Upgrade lora_jax.")
    stored = meta.pop("meta_sha256", None)
    if stored != hashlib.sha256(_canonical(meta)).hexdigest():
        raise CheckpointIntegrityError(f"checkpoint metadata file {f} fails its sha256 check "
                                       "(corrupted or edited).")
    return meta


def read_adapter_metadata(directory, step: int | None = None) -> dict:
    """The JSON metadata of ``step`` (default: the latest complete one); ``["user"]`` is
    what was passed as ``metadata=``."""
    root = _root(directory)
    return _load_meta(root, _resolve_step(root, step))


def _array_files(item_dir: Path, key: str) -> str:
    d = item_dir / key
    if not d.is_dir():
        return f"{d} (missing)"
    files = sorted(p.name for p in d.iterdir() if p.is_file())
    return f"{d}/{{{', '.join(files)}}}"


def _read_array(array_dir: Path):
    """(numpy value, None) of one zarr array read directly with tensorstore, or (None, error)."""
    import tensorstore as ts
    try:
        spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(array_dir)}}
        return np.asarray(ts.open(spec, open=True, read=True).result().read().result()), None
    except Exception as e:  # noqa: BLE001 - reported with the file name
        return None, f"{type(e).__name__}: {str(e)[:300]}"


def _restore_args(ocp, x):
    if isinstance(x, jax.Array):
        return ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.asarray(x).dtype)


def _restore_item(root: Path, step: int, item: str, templates: dict, table: dict) -> dict:
    """Restore {key: array} of one item onto the templates' shardings, then verify sha256."""
    ocp = _ocp()
    item_dir = root / str(step) / item
    if not item_dir.is_dir():
        raise CheckpointIntegrityError(f"checkpoint item directory {item_dir} is missing.")
    for key in templates:
        if not (item_dir / key).is_dir():
            raise CheckpointIntegrityError(
                f"array {table[key]['path']!r}: its directory {item_dir / key} is missing.")

    def restore(keys):
        tmpl = {k: templates[k] for k in keys}
        args = {k: _restore_args(ocp, v) for k, v in tmpl.items()}
        with _quiet_orbax():
            mngr = _manager(root, read_only=True)
            try:
                out = mngr.restore(step, args=ocp.args.Composite(
                    **{item: ocp.args.PyTreeRestore(item=tmpl, restore_args=args)}))
            finally:
                mngr.close()
        return dict(out[item])

    # 1. Read every array's files directly (tensorstore, host numpy) and check its sha256:
    #    a truncated, corrupted or bit-flipped file is named before orbax touches it.
    bad = []
    for k in templates:
        data, err = _read_array(item_dir / k)
        if err is not None:
            bad.append(f"array {table[k]['path']!r} in {_array_files(item_dir, k)} is truncated "
                       f"or corrupted: {err}")
        elif table[k].get("sha256") is not None and _sha256_array(data) != table[k]["sha256"]:
            bad.append(f"array {table[k]['path']!r} fails its sha256 check: the file(s) "
                       f"{_array_files(item_dir, k)} are corrupted (bit flip or edit)")
    if bad:
        raise CheckpointIntegrityError(f"checkpoint {item_dir}: " + _limit(bad, 5))
    # 2. Restore with orbax onto the templates' shardings; verify what arrived.
    with _drop_orbax_unraisable():
        try:
            restored = restore(list(templates))
        except Exception as e:
            failure = e
        else:
            failure = None
    if failure is not None:
        raise CheckpointIntegrityError(
            f"checkpoint {item_dir} could not be read: {type(failure).__name__}: "
            f"{str(failure)[:800]}") from failure
    for k, x in restored.items():
        expected = table[k].get("sha256")
        host = None if expected is None else _host(x)
        if host is not None and _sha256_array(host) != expected:
            raise CheckpointIntegrityError(
                f"array {table[k]['path']!r} changed while restoring from "
                f"{_array_files(item_dir, k)} (sha256 mismatch).")
    return restored


def _match_templates(flat: list[tuple[str, Any]], table: dict, what: str) -> dict:
    """{orbax key: template leaf}, checking paths, shapes and dtypes against the table."""
    by_path = {v["path"]: k for k, v in table.items()}
    now = {p for p, _ in flat}
    problems = []
    missing = sorted(set(by_path) - now)
    extra = sorted(now - set(by_path))
    if missing:
        problems.append(f"{what} leaves in the checkpoint but not in the template: {_limit(missing)}")
    if extra:
        problems.append(f"{what} leaves in the template but not in the checkpoint: {_limit(extra)}")
    templates = {}
    for path, x in flat:
        if path not in by_path:
            continue
        key = by_path[path]
        if not hasattr(x, "shape"):
            x = np.asarray(x)
        shape, dtype = [int(d) for d in x.shape], _dtype_name(x)
        if shape != table[key]["shape"] or dtype != table[key]["dtype"]:
            problems.append(f"{what} leaf {path}: checkpoint {tuple(table[key]['shape'])} "
                            f"{table[key]['dtype']}, template {tuple(shape)} {dtype}")
        templates[key] = x
    if problems:
        raise ValueError("restore_adapter: " + "\n  ".join(problems))
    return templates


def restore_adapter(directory, params, *, step: int | None = None, opt_state=None,
                    allow_different_base: bool = False):
    """Load the A/B leaves of checkpoint ``step`` (default: latest complete) into ``params``.

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
    root = _root(directory)
    step = _resolve_step(root, step)
    meta = _load_meta(root, step)

    problems = _compare_config(meta["lora"], _lora_config(params), "LoRA leaves")
    problems += _compare_config(meta.get("quantization", {}), _quant_config(params),
                                "quantized base leaves")
    problems += _compare_base(meta["base"], base_fingerprint(params), allow_different_base)
    if problems:
        raise BaseMismatchError(
            f"restore_adapter: checkpoint {root / str(step)} was saved for another base:\n  "
            + "\n  ".join(problems))

    trainable, frozen = split(params)
    flat_tr, treedef = _flat(trainable)
    templates = _match_templates(flat_tr, meta["arrays"][_ADAPTER], "adapter")
    restored = _restore_item(root, step, _ADAPTER, templates, meta["arrays"][_ADAPTER])
    by_path = {v["path"]: k for k, v in meta["arrays"][_ADAPTER].items()}
    leaves = [restored[by_path[p]] for p, _ in flat_tr]
    new_params = combine(jax.tree_util.tree_unflatten(treedef, leaves), frozen)
    if opt_state is None:
        return new_params

    table = meta["arrays"].get(_OPT)
    if table is None:
        raise ValueError(f"restore_adapter: checkpoint {root / str(step)} holds no optimizer "
                         "state (it was saved without opt_state=).")
    flat_opt, opt_def = _flat(opt_state)
    opt_templates = _match_templates(flat_opt, table, "opt_state")
    restored_opt = _restore_item(root, step, _OPT, opt_templates, table)
    opt_by_path = {v["path"]: k for k, v in table.items()}
    opt_leaves = [restored_opt[opt_by_path[p]] for p, _ in flat_opt]
    return new_params, jax.tree_util.tree_unflatten(opt_def, opt_leaves)


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------

_LLAMA_LAYER = re.compile(r"^layers/(.+)/(kernel|bias|scale)$")


def _strip_params(flat: dict) -> dict:
    if flat and all(p.startswith("params/") for p in flat):
        return {p[len("params/"):]: x for p, x in flat.items()}
    return flat


def _is_llama(flat: dict) -> bool:
    return "embed_tokens/embedding" in flat and "layers/self_attn/q_proj/kernel" in flat


def _llama_names(flat: dict) -> dict:
    """Our stacked (in, out) Llama tree -> HF ``LlamaForCausalLM`` names, (out, in)."""
    out = {}
    for path, x in flat.items():
        if path == "embed_tokens/embedding":
            out["model.embed_tokens.weight"] = x
        elif path == "norm/scale":
            out["model.norm.weight"] = x
        elif path == "lm_head/kernel":
            out["lm_head.weight"] = x.T
        else:
            m = _LLAMA_LAYER.match(path)
            if not m:
                raise ValueError(f"export_merged: no HF Llama name for leaf {path!r}; pass "
                                 "name_map='path' or a callable.")
            module, kind = m.group(1).replace("/", "."), m.group(2)
            for i in range(x.shape[0]):
                if kind == "kernel":
                    out[f"model.layers.{i}.{module}.weight"] = x[i].T
                elif kind == "scale":
                    out[f"model.layers.{i}.{module}.weight"] = x[i]
                else:
                    out[f"model.layers.{i}.{module}.bias"] = x[i]
    return out


def _quantized_tensors(name: str, node) -> tuple[dict, dict]:
    tensors = {}
    for f in dataclasses.fields(node):
        if not f.metadata.get("static"):
            v = getattr(node, f.name)
            if v is not None:
                tensors[f"{name}.{f.name}"] = np.asarray(jax.device_get(v))
    info = {**_static_fields(node), "type": type(node).__name__,
            "shape": [int(d) for d in node.shape], "dtype": str(np.dtype(node.dtype))}
    return tensors, info


def export_merged(params, out_dir, *, requantize: str | Callable | None = None,
                  name_map: str | Callable | None = None, overwrite: bool = False) -> str:
    """Write ``merge(params)`` as ``out_dir/model.safetensors`` for serving.

    * ``name_map=None`` (auto): the reference Llama tree (``embed_tokens/embedding``,
      ``layers/self_attn/q_proj/kernel`` stacked on [L], ...) is written with HF names
      (``model.layers.{i}.self_attn.q_proj.weight``) in torch's (out, in) orientation;
      any other tree as '/'-joined paths in our (in, out) layout. ``"hf_llama"`` /
      ``"path"`` force one; a callable ``(flat: {path: np.ndarray}) -> {name: array}``
      does its own naming.
    * Quantized leaves that are not LoRA'd are dequantized (plain weights out).
    * ``requantize``: a callable ``(name, array) -> array or QuantizedWeight`` applied to
      every exported tensor, or a kind string (``"nf4"``, ...) given to
      ``lora_jax.quantize`` for each ≥2-D floating ``*.weight``/``*kernel`` tensor. A
      quantized tensor is written as ``{name}.{field}`` for each of its array fields,
      its static config under the safetensors metadata key ``lora_jax.quantized``.

    Atomic: written into a temporary sibling directory and renamed into place.
    Returns the path of the safetensors file.
    """
    from safetensors.numpy import save_file

    merged = merge(params)
    merged = jax.tree.map(lambda x: x.materialize() if isinstance(x, ImplicitArray) else x,
                          merged, is_leaf=is_implicit)
    flat_list, _ = _flat(merged)
    flat = _strip_params({p: np.asarray(jax.device_get(x)) for p, x in flat_list})
    if name_map is None:
        name_map = "hf_llama" if _is_llama(flat) else "path"
    if name_map == "hf_llama":
        named = _llama_names(flat)
    elif name_map == "path":
        named = dict(flat)
    elif callable(name_map):
        named = dict(name_map(flat))
    else:
        raise ValueError(f"name_map must be None, 'hf_llama', 'path' or a callable; got {name_map!r}.")

    quant_info = {}
    tensors = {}
    rq = _requantizer(requantize)
    for name, x in named.items():
        y = rq(name, x) if rq is not None else x
        if isinstance(y, ImplicitArray):
            t, info = _quantized_tensors(name, y)
            tensors.update(t)
            quant_info[name] = info
        else:
            tensors[name] = np.ascontiguousarray(np.asarray(jax.device_get(y)))
    st_meta = {"format": "pt"}
    if quant_info:
        st_meta["lora_jax.quantized"] = json.dumps(quant_info, sort_keys=True)

    out = Path(os.fspath(out_dir)).absolute()
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export_merged: {out} exists and is not empty; pass overwrite=True.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata=st_meta)
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, trash)
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out / "model.safetensors")


def _requantizer(requantize):
    if requantize is None or callable(requantize):
        return requantize
    if isinstance(requantize, str):
        kind = requantize
        from lora_jax.quant.quantize import quantize_array

        def rq(name, x):
            leaf = name.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
            if x.ndim == 2 and jnp.issubdtype(x.dtype, jnp.floating) and leaf in ("weight", "kernel") \
                    and "embed" not in name:
                return quantize_array(x, kind, path=name)   # in the exported orientation
            return x
        return rq
    raise ValueError(f"requantize must be None, a kind string or a callable; got {requantize!r}.")
