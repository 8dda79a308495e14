"""Crash-test worker: saves adapter checkpoints in a loop until it is killed.

Usage: python _ckpt_worker.py DIRECTORY
Each step k stores A = k, B = -k (plus an opt_state leaf = k) and prints "saved k"
once save_adapter has returned. It continues after the latest complete step found
in DIRECTORY, so repeated kills exercise saves over leftovers of interrupted ones.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo root

import lora_jax as lj  # noqa: E402
from lora_jax import checkpoint as ck  # noqa: E402


def params_for(step: int):
    """The tree the tests restore onto: fixed base, A = step, B = -step.

    Host numpy leaves (no jit compile in a process that lives a second)."""
    def lw(d_in, d_out, w0):
        return lj.LoraWeight(w0=w0, a=np.full((d_in, 3), step, np.float32),
                             b=np.full((3, d_out), -step, np.float32), alpha=6.0)
    w1 = np.arange(45 * 37, dtype=np.float32).reshape(45, 37) / np.float32(100.0)
    return {"d1": {"kernel": lw(45, 37, w1), "bias": np.ones((37,), np.float32)},
            "d2": {"kernel": lw(37, 29, np.ones((37, 29), np.float32))}}


def main(directory: str) -> None:
    steps = ck.adapter_steps(directory) if os.path.isdir(directory) else []
    step = steps[-1] + 1 if steps else 1
    while True:
        p = params_for(step)
        ck.save_adapter(directory, p, step=step, keep=3,
                        opt_state={"count": np.full((), step, np.int32)},
                        metadata={"step": step})
        print(f"saved {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main(sys.argv[1])
