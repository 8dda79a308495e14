"""The commands behind the README's figures; run each from the repo root as
``python -m experiments.<name>``. Results are written under ``experiments/results/``."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"


def repo_relative(path: str | os.PathLike) -> str:
    """``path`` as results record it: relative to the repo root when it lies inside it, so no
    machine's directory layout ends up in a committed JSON file."""
    p = Path(path).resolve()
    return p.relative_to(REPO).as_posix() if p.is_relative_to(REPO) else str(path)
