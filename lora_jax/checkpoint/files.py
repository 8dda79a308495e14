"""safetensors and JSON files, checked before use, with errors that name the file.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {dtype, shape, data_offsets}}`` and an optional ``__metadata__`` of strings),
then the tensor bytes. :func:`safetensors_header` checks ``N`` and every offset against
the file's size before anything is allocated, so a truncated file, a flipped header
byte or a header length of 2**62 is a ``ValueError`` naming the file (and the tensor),
never a ``MemoryError`` or a reshape error. Files this library writes
(:func:`write_safetensors`) also record each tensor's sha256 in the metadata key
``lora_jax.sha256``, which :func:`read_safetensors` checks, so a flipped data byte
is caught too (other readers ignore the key).

Example:
    >>> import pathlib, tempfile, numpy as np
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> f = write_safetensors(d / "t.safetensors", {"w": np.ones((5, 7), np.float32)})
    >>> read_safetensors(f)["w"].shape
    (5, 7)
    >>> f.write_bytes(f.read_bytes()[:-3]) and None
    >>> read_safetensors(f)                  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: .../t.safetensors is truncated or corrupted: tensor 'w' needs data bytes ...
    >>> import shutil; shutil.rmtree(d)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lora_jax.checkpoint.atomic import atomic_file

__all__ = ["read_json", "read_safetensors", "safetensors_header", "write_safetensors"]

#: bytes per element of the safetensors dtypes (others are bounds-checked only)
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U64": 8, "I32": 4, "U32": 4,
             "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "C64": 8, "F8_E4M3": 1,
             "F8_E5M2": 1, "F8_E8M0": 1}
#: the safetensors library's own limit on the JSON header
MAX_HEADER = 100 * 1024 * 1024
SHA_KEY = "lora_jax.sha256"


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; a ``ValueError`` naming the file when it is not JSON."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 JSON file ({e.reason} at byte {e.start}).") \
            from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column "
                         f"{e.colno}); fix or replace the file.") from None


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"{path} is truncated or corrupted: {what}.")


def _raw_header(path: Path) -> tuple[dict, int, int]:
    """``(header dict, data start, data length)``, the length prefix bounded by the size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _bad(path, f"{size} bytes, shorter than the 8-byte safetensors header length")
        (n,) = struct.unpack("<Q", prefix)
        if n > size - 8 or n > MAX_HEADER:
            raise _bad(path, f"the header length says {n} bytes, the file has {size - 8} "
                       "after the length prefix (not a safetensors file, or cut short)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"its {n}-byte JSON header does not parse ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, f"its header is a JSON {type(header).__name__}, not an object")
    return header, 8 + n, size - 8 - n


def _check_entry(path: Path, name: str, e: Any, n_data: int) -> tuple[int, int]:
    if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
        raise _bad(path, f"tensor {name!r} has no dtype/shape/data_offsets entry")
    shape, offs = e["shape"], e["data_offsets"]
    ints = (isinstance(shape, list) and isinstance(offs, list) and len(offs) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                    for v in [*shape, *offs]))
    if not ints:
        raise _bad(path, f"tensor {name!r} has shape {shape!r} / data_offsets {offs!r} "
                   "(need non-negative ints)")
    lo, hi = offs
    if lo > hi or hi > n_data:
        raise _bad(path, f"tensor {name!r} needs data bytes [{lo}, {hi}) but the file holds "
                   f"{n_data} data bytes")
    itemsize = _ITEMSIZE.get(e["dtype"])
    if itemsize is not None and (hi - lo) != math.prod(shape) * itemsize:
        raise _bad(path, f"tensor {name!r} ({e['dtype']} {shape}) should span "
                   f"{math.prod(shape) * itemsize} bytes, its data_offsets give {hi - lo}")
    return lo, hi


def safetensors_header(path: str | os.PathLike) -> tuple[dict, dict]:
    """``({tensor: {dtype, shape, data_offsets}}, metadata)``, every length and offset
    checked against the file's size (nothing is allocated from a length in the file)."""
    path = Path(path)
    header, _, n_data = _raw_header(path)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _bad(path, "its __metadata__ is not an object")
    spans = sorted((_check_entry(path, k, v, n_data), k) for k, v in header.items())
    for (span, name), (nxt, other) in zip(spans, spans[1:]):
        if nxt[0] < span[1]:
            raise _bad(path, f"tensors {name!r} and {other!r} overlap")
    return header, meta


def _digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays, checked first
    (:func:`safetensors_header`) and, when the file records them, against their sha256."""
    from safetensors.numpy import load_file

    path = Path(path)
    _, meta = safetensors_header(path)
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is reported with the file name
        raise ValueError(f"{path} could not be read as safetensors: {type(e).__name__}: "
                         f"{str(e)[:300]}") from None
    if SHA_KEY in meta:
        try:
            expected = json.loads(meta[SHA_KEY])
        except (TypeError, json.JSONDecodeError):
            raise _bad(path, f"its {SHA_KEY} metadata does not parse") from None
        bad = sorted(k for k, x in tensors.items() if expected.get(k) != _digest(x))
        if bad:
            raise _bad(path, f"tensor(s) {bad} fail their sha256 check (a changed data byte)")
    return tensors


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` atomically (temp file, then rename), each tensor's
    sha256 recorded in the metadata key ``lora_jax.sha256``."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {}),
            SHA_KEY: json.dumps({k: _digest(v) for k, v in tensors.items()}, sort_keys=True)}
    return atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
