"""The errors a checkpoint restore raises, and how their messages list what differs."""

from __future__ import annotations


class BaseMismatchError(ValueError):
    """The params given to ``restore_adapter`` are not the base the adapter was trained on."""


class CheckpointIntegrityError(ValueError):
    """A checkpoint file is missing, truncated or corrupted (the message names it)."""


def limit(items: list[str], n: int = 12) -> str:
    """``items`` joined for a message, the first ``n`` only: a 7B base has thousands of leaves.

    >>> limit(["a", "b", "c"], 2)
    'a; b ... and 1 more'
    """
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def one_sided(saved, now, what: str, other: str = "params") -> list[str]:
    """Messages naming the ``what`` only in the checkpoint (``saved``) or only in ``other``."""
    out = []
    missing, extra = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
    if missing:
        out.append(f"{what} in the checkpoint but not in {other}: {limit(missing)}")
    if extra:
        out.append(f"{what} in {other} but not in the checkpoint: {limit(extra)}")
    return out
