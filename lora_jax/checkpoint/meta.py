"""The JSON metadata of a checkpoint step: what it holds, and its integrity check.

Written in the same atomic commit as the arrays (``<step>/lora_meta/metadata``):

* ``lora``: per adapter leaf path its type, rank, static fields and factor shapes;
  ``targets``: those paths; ``quantization``: per quantized base leaf its config
  (see :mod:`lora_jax.checkpoint.config`);
* ``base``: the fingerprint of the frozen base (:func:`~lora_jax.checkpoint.base_fingerprint`);
* ``arrays``: per item (``adapter``, ``opt_state``) and orbax key the tree path, shape,
  dtype and sha256 of each saved array;
* ``user``: the ``metadata=`` given to ``save_adapter``; ``library_version``,
  ``jax_version``, ``orbax_version``, ``step``, ``format`` and ``format_version``;
* ``meta_sha256``: the sha256 of everything else, so an edit is refused.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata as _metadata
from pathlib import Path

import jax

from lora_jax.checkpoint.arrays import canonical
from lora_jax.checkpoint.errors import CheckpointIntegrityError
from lora_jax.checkpoint.fingerprint import FULL_HASH_MAX, N_SAMPLES
from lora_jax.checkpoint.orbax_io import META, META_FILE

__all__ = ["FORMAT", "FORMAT_VERSION", "load_meta", "make_meta"]

FORMAT = "lora_jax.adapter"
FORMAT_VERSION = 1


def _version(dist: str) -> str:
    try:
        return _metadata.version(dist)
    except _metadata.PackageNotFoundError:   # a source tree that was never installed
        return "0+unknown"


def make_meta(*, step: int, lora: dict, quantization: dict, base: dict, arrays: dict,
              user: dict) -> dict:
    """The metadata dict of one step, sealed with its ``meta_sha256``."""
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": step,
        "library_version": _version("lora-jax"),
        "jax_version": jax.__version__,
        "orbax_version": _version("orbax-checkpoint"),
        "targets": list(lora), "lora": lora, "quantization": quantization,
        "base": base, "arrays": arrays, "user": user,
        "fingerprint_scheme": {"full_hash_max_elements": FULL_HASH_MAX,
                               "samples": N_SAMPLES, "hash": "sha256"},
    }
    meta["meta_sha256"] = hashlib.sha256(canonical(meta)).hexdigest()
    return meta


def _parse(f: Path) -> dict:
    try:
        raw = f.read_bytes()
    except FileNotFoundError:
        raise CheckpointIntegrityError(f"checkpoint metadata file {f} is missing.") from None
    except OSError as e:
        raise CheckpointIntegrityError(
            f"checkpoint metadata file {f} cannot be read ({e.strerror}).") from None
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointIntegrityError(
            f"checkpoint metadata file {f} is truncated or corrupted ({e}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointIntegrityError(f"{f} is not a lora_jax adapter checkpoint metadata file.")
    return meta


def load_meta(root: Path, step: int) -> dict:
    """The verified metadata of ``root/step`` (without ``meta_sha256``)."""
    f = root / str(step) / META / META_FILE
    meta = _parse(f)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{f} has format_version {meta.get('format_version')}; this lora_jax "
                         f"reads up to {FORMAT_VERSION}. Upgrade lora_jax.")
    stored = meta.pop("meta_sha256", None)
    if stored != hashlib.sha256(canonical(meta)).hexdigest():
        raise CheckpointIntegrityError(f"checkpoint metadata file {f} fails its sha256 check "
                                       "(corrupted or edited).")
    return meta
