"""One process of the two-process (loopback, CPU/gloo) sharded LoRA training test.

Usage: python _mp_worker.py PROCESS_ID NUM_PROCESSES PORT CKPT_DIR OUT_JSON

Each process has 4 local CPU devices; together they form a (2, 2, 2) ("data", "fsdp",
"tensor") mesh over 8 devices. Both train the same LoRA Llama for 5 steps, save the
adapter (+ optimizer state) with ``save_adapter``, take a 6th step, then restore the
checkpoint onto freshly placed params and take the 6th step again. Process 0 writes the
losses to OUT_JSON. ``build()`` is shared with the single-process reference in
tests/test_multiprocess.py so both run the same model, data and optimizer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

STEPS = 5


def build():
    """(model, lorafied params, batch, loss_fn, tx) -- deterministic, host-side."""
    import jax
    import optax

    import lora_jax as lj
    from lora_jax.models.llama import LlamaConfig, LlamaForCausalLM
    from lora_jax.scale import cross_entropy_loss

    cfg = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    model = LlamaForCausalLM(cfg)
    params = model.init_params(jax.random.key(0), 4)
    lp = lj.lorafy(params, rank=4, key=jax.random.key(1))
    ids = jax.random.randint(jax.random.key(2), (8, 9), 0, cfg.vocab_size)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    return model, lp, batch, cross_entropy_loss(lj.lora(model.apply)), optax.adam(1e-2)


def main(pid: int, nproc: int, port: int, ckpt: str, out: str) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repo root
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc,
                               process_id=pid, initialization_timeout=60)
    import numpy as np

    import lora_jax as lj
    from lora_jax.checkpoint import restore_adapter, save_adapter
    from lora_jax.scale import fsdp_specs, lora_specs, make_train_step

    assert jax.process_count() == nproc and len(jax.devices()) == 4 * nproc
    _, lp, batch, loss_fn, tx = build()
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    specs = lora_specs(lp, fsdp_specs(lp, mesh, min_size=256), mesh)
    step = make_train_step(loss_fn, tx, mesh, specs)
    tr, fr, opt = step.init(lp)
    gbatch = step.shard_batch(batch)
    losses = []
    for _ in range(STEPS):
        tr, opt, loss = step(tr, fr, opt, gbatch)
        losses.append(float(loss))
    save_adapter(ckpt, lj.combine(tr, fr), step=STEPS, opt_state=opt)
    q = tr["layers"]["self_attn"]["q_proj"]["kernel"]
    specs_seen = {"a": str(q.a.sharding.spec), "b": str(q.b.sharding.spec),
                  "local_shards": len(q.a.addressable_shards)}
    tr, opt, loss6 = step(tr, fr, opt, gbatch)

    # Restore onto freshly placed params (A/B re-initialised) and redo step 6.
    tr2, fr2, opt2 = step.init(lp)
    restored, opt_r = restore_adapter(ckpt, lj.combine(tr2, fr2), opt_state=opt2)
    tr_r, _ = lj.split(restored)
    _, _, loss6_r = step(tr_r, fr2, opt_r, gbatch)
    if pid == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "loss6": float(loss6), "loss6_restored": float(loss6_r),
                       "process_count": jax.process_count(), "devices": len(jax.devices()),
                       "specs": specs_seen}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), a[3], a[4])
