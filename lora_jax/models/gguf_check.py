"""A GGUF file's header walked against the file's size before the ``gguf`` package reads it.

``gguf.GGUFReader`` trusts every count and length in the file: a corrupted array length
of 2**60 makes it loop (almost) forever, a short file gives ``IndexError`` or a reshape
error far from the cause. :func:`check_gguf` walks the metadata and the tensor table
with a bounds-checked cursor (each count is checked against the bytes left before it
is used) and checks that every tensor's data lies inside the file.

Example:
    >>> import pathlib, tempfile
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "m.gguf"
    >>> f.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**60).to_bytes(8, "little")
    ...               + (0).to_bytes(8, "little")) and None
    >>> check_gguf(f)
    Traceback (most recent call last):
    ValueError: .../m.gguf is not a readable GGUF file: 1152921504606846976 tensor infos needs ...
    >>> import shutil; shutil.rmtree(f.parent)
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["check_gguf"]


#: bytes of the fixed-size GGUF metadata value types (8: string and 9: array are walked)
_VALUE_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Scan:
    """A bounds-checked cursor over a GGUF file's header (every count and length is
    checked against the bytes left before it is used, so a corrupted count can neither
    allocate nor loop for long)."""

    def __init__(self, path: Path, buf):
        self.path, self.buf, self.pos = path, buf, 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path} is not a readable GGUF file: {what} (at byte "
                          f"{self.pos} of {len(self.buf)}); it is truncated or corrupted.")

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            raise self.fail(f"{what} needs {n} bytes, {len(self.buf) - self.pos} are left")

    def take(self, n: int, what: str) -> int:
        self.need(n, what)
        self.pos += n
        return self.pos - n

    def u(self, size: int, what: str) -> int:
        start = self.take(size, what)
        return int.from_bytes(self.buf[start:start + size], "little")

    def string(self, what: str) -> str:
        n = self.u(8, f"the length of {what}")
        start = self.take(n, what)
        return bytes(self.buf[start:start + n]).decode("utf-8", "replace")

    def value(self, vtype: int, what: str, depth: int = 0) -> int | None:
        """Skip one value; returns it when it is a UINT32 (general.alignment)."""
        if vtype in _VALUE_SIZE:
            v = self.u(_VALUE_SIZE[vtype], what)
            return v if vtype == 4 else None
        if vtype == 8:
            self.string(what)
        elif vtype == 9 and depth < 4:
            itype, count = self.u(4, f"{what} item type"), self.u(8, f"{what} length")
            least = _VALUE_SIZE.get(itype, 8 if itype == 8 else 12)
            self.need(count * least, f"{what} ({count} items)")
            if itype in _VALUE_SIZE:
                self.take(count * _VALUE_SIZE[itype], what)
            else:
                for _ in range(count):
                    self.value(itype, what, depth + 1)
        else:
            raise self.fail(f"{what} has unknown value type {vtype}")
        return None


def _tensor_infos(sc: _Scan, n_tensors: int) -> list[tuple[str, int, int]]:
    """``[(name, byte length, offset)]`` of the tensor infos."""
    sc.need(n_tensors * 24, f"{n_tensors} tensor infos")
    out = []
    for _ in range(n_tensors):
        name = sc.string("a tensor name")
        n_dims = sc.u(4, f"tensor {name!r} rank")
        if n_dims > 8:
            raise sc.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [sc.u(8, f"tensor {name!r} shape") for _ in range(n_dims)]
        ttype = sc.u(4, f"tensor {name!r} type")
        if ttype not in {int(t) for t in GGML_QUANT_SIZES}:
            raise sc.fail(f"tensor {name!r} has unknown type {ttype}")
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        out.append((name, math.prod(dims) * size // block, sc.u(8, f"tensor {name!r} offset")))
    return out


def check_gguf(path: str | os.PathLike) -> None:
    """Walk a GGUF file's header and tensor table against its size; a ``ValueError``
    naming the file (and the key or tensor) for anything out of bounds or unknown."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        sc = _Scan(path, memoryview(buf))
        try:
            if bytes(buf[:4]) != b"GGUF":
                raise sc.fail("it does not start with the GGUF magic bytes")
            sc.take(4, "the magic")
            version, n_tensors, n_kv = sc.u(4, "the version"), sc.u(8, "the tensor count"), \
                sc.u(8, "the metadata count")
            if version not in (2, 3):
                raise sc.fail(f"version {version} (2 and 3 are supported)")
            sc.need(n_kv * 13, f"{n_kv} metadata keys")
            align = 32
            for _ in range(n_kv):
                key = sc.string("a metadata key")
                v = sc.value(sc.u(4, f"key {key!r} type"), f"metadata key {key!r}")
                align = v if key == "general.alignment" and v else align
            infos = _tensor_infos(sc, n_tensors)
            start = -(-sc.pos // align) * align
            for name, nbytes, off in infos:
                if start + off + nbytes > len(buf):
                    raise sc.fail(f"tensor {name!r} needs bytes [{start + off}, "
                                  f"{start + off + nbytes}) beyond the end of the file")
        finally:
            sc.buf.release()
