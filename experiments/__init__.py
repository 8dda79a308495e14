"""The commands behind the README's figures; run each from the repo root as
``python -m experiments.<name>``. Results are written under ``experiments/results/``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"


def repo_relative(path: str | os.PathLike) -> str:
    """``path`` as results record it: relative to the repo root when it lies inside it, so no
    machine's directory layout ends up in a committed JSON file."""
    p = Path(path).resolve()
    return p.relative_to(REPO).as_posix() if p.is_relative_to(REPO) else str(path)


def machine() -> dict:
    """What a result was measured on (no paths)."""
    import jax
    return {"platform": platform.platform(), "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "jax": jax.__version__,
            "cpu_count": os.cpu_count()}


def write_json(path: str | os.PathLike, result: dict) -> Path:
    """``result`` as indented JSON at ``path`` (parents created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return out
