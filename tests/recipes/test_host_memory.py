"""``reexec_with_malloc_tunables``: the re-executed process keeps its command line, and a
worker thread's large block stops page-faulting from its second use on."""

import json
import os
import platform
import subprocess
import sys

import pytest

from lora_jax.recipes import MALLOC_TUNABLES

pytestmark = pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc tunables")

# What XLA:CPU does each step: a fresh thread-pool worker mallocs the step's temporaries
# (96 MB here), writes them, frees them. Minor faults per use, counted on that thread.
PROGRAM = """
import ctypes, json, os, resource, sys, threading
from lora_jax.recipes import reexec_with_malloc_tunables
reexec_with_malloc_tunables()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n, faults = 96 * 2**20, []
def use():
    r0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - r0)
for _ in range(4):
    t = threading.Thread(target=use)
    t.start()
    t.join()
print(json.dumps({"faults": faults, "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "argv": sys.argv[1:]}))
"""
PAGES = 96 * 2**20 // 4096


def _run(env_tunables):
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    if env_tunables is not None:
        env["GLIBC_TUNABLES"] = env_tunables
    r = subprocess.run([sys.executable, "-c", PROGRAM, "a", "--b=1"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_reexec_sets_tunables_keeps_argv_and_keeps_the_block():
    kept = _run(None)
    assert kept["tunables"] == MALLOC_TUNABLES
    assert kept["argv"] == ["a", "--b=1"]
    assert kept["faults"][0] > 0.9 * PAGES                 # first use: fresh pages
    assert max(kept["faults"][1:]) < PAGES // 100, kept    # then the same pages again
    # glibc's defaults: mmap'd and unmapped each time, so every use faults every page
    control = _run("")
    assert control["tunables"] == "" and control["argv"] == ["a", "--b=1"]
    assert min(control["faults"]) > 0.9 * PAGES, control


def test_user_tunables_are_left_alone():
    assert _run("glibc.malloc.arena_max=2")["tunables"] == "glibc.malloc.arena_max=2"
