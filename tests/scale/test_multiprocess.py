"""Two processes (4 CPU devices each, gloo collectives over loopback) train one sharded step.

They must reproduce the single-process losses, and save + restore a sharded adapter
checkpoint (``save_adapter`` / ``restore_adapter``) that resumes bit-for-bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from _mp_worker import STEPS, build
from jax.sharding import Mesh

WORKER = Path(__file__).with_name("_mp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference():
    from lora_jax.scale import fsdp_specs, lora_specs, make_train_step

    _, lp, batch, loss_fn, tx = build()
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    step = make_train_step(loss_fn, tx, mesh, lora_specs(lp, fsdp_specs(lp, mesh), mesh))
    tr, fr, opt = step.init(lp)
    b = step.shard_batch(batch)
    losses = []
    for _ in range(STEPS + 1):
        tr, opt, loss = step(tr, fr, opt, b)
        losses.append(float(loss))
    return np.array(losses)


def test_two_processes_match_single_process(tmp_path):
    port = _free_port()
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port),
                               str(tmp_path / "ckpt"), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for i in range(2)]
    # Compute the single-process reference while the workers run.
    ref = _reference()
    logs = []
    try:
        for p in procs:
            o, _ = p.communicate(timeout=max(1.0, 120 - (time.perf_counter() - t0)))
            logs.append(o.decode(errors="replace"))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("the two-process run did not finish within 2 minutes")
    elapsed = time.perf_counter() - t0
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    res = json.loads(out.read_text())
    assert res["process_count"] == 2 and res["devices"] == 8
    assert res["specs"] == {"a": "P(None, 'fsdp', None)", "b": "P(None, None, 'tensor')",
                            "local_shards": 4}
    np.testing.assert_allclose(res["losses"], ref[:STEPS], rtol=1e-5)
    np.testing.assert_allclose(res["loss6"], ref[STEPS], rtol=1e-5)
    assert res["loss6_restored"] == res["loss6"]        # restore resumes exactly
    assert elapsed < 120
