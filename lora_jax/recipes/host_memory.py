"""Keep XLA:CPU's per-step temporaries mapped from one step to the next (glibc only).

XLA:CPU allocates an executable's temporaries afresh on every run, from a worker thread.
glibc serves a block that large from ``mmap`` (a worker's arena cannot grow past 64 MB) and
unmaps it on free, so every step page-faults every temporary page in again: on the
SmolLM2-135M grad step (4 x 512 tokens, 3.3 GB of temporaries) about a million minor faults
and 3 s of kernel time per step, on 2 cores. One arena that never unmaps and never trims
serves the next step from the pages the last one freed: no faults.

glibc reads these settings only at process start, so a program re-executes itself once, as
the first thing it does (``lora-jax`` and the experiments do)::

    if __name__ == "__main__":
        reexec_with_malloc_tunables()
        main()

The cost: the process keeps its peak heap until it exits.
"""

from __future__ import annotations

import os
import platform
import sys

# 1 TiB: "never" for trimming; a value below the temporaries' size would give them back.
TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            "glibc.malloc.trim_threshold=1099511627776")


def reexec_with_malloc_tunables() -> None:
    """Re-run this process's command line with :data:`TUNABLES` set; no-op off glibc Linux.

    A ``GLIBC_TUNABLES`` already in the environment is left alone (set it to ``""`` to opt
    out); so is a process that is not a plain command line (``sys.orig_argv`` missing).
    """
    argv = getattr(sys, "orig_argv", None)
    if (sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or not argv
            or not sys.executable or "GLIBC_TUNABLES" in os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]],
                  {**os.environ, "GLIBC_TUNABLES": TUNABLES})
    except OSError:
        return        # an interpreter that cannot exec itself runs on with glibc's defaults
