"""Where a grad step's time goes on XLA:CPU: jax.profiler per-thunk times, by category.

    python -m experiments.profile_step   # writes experiments/results/profile_step.json

Same model/batch as experiments/bench.py (small: 20M params, 8x256 tokens). Events on
XLA's Eigen worker threads are summed per category for the full fine-tune step and our
LoRA step (2 profiled steps each, after warm-up).
"""

import collections
import glob
import json
import shutil
import tempfile

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from experiments import RESULTS
from experiments import bench as B
from lora_jax.models import LlamaConfig, LlamaForCausalLM


def category(name):
    if name.startswith(("ynn_fusion", "dot", "custom-call")):
        return "matmul fusions (YNNPACK/dot)"
    if "copy" in name or "transpose" in name or "bitcast" in name:
        return "layout copies/transposes"
    if "broadcast" in name:
        return "broadcasts"
    if "dynamic" in name or "slice" in name:
        return "dynamic slices"
    if name.startswith(("ThunkExecutor", "$")) or "wait" in name:
        return None
    return "elementwise/other fusions"


def profile(fn, args, steps=2):
    from jax._src.lib import _profile_data
    jax.block_until_ready(fn(*args))
    d = tempfile.mkdtemp()
    try:
        with jax.profiler.trace(d):
            for _ in range(steps):
                jax.block_until_ready(fn(*args))
        xplane = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]
        pd = _profile_data.ProfileData.from_file(xplane)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    per = collections.Counter()
    for plane in pd.planes:
        for line in plane.lines:
            if "Eigen" in line.name:
                for ev in line.events:
                    c = category(ev.name)
                    if c:
                        per[c] += ev.duration_ns / steps / 1e6
    return dict(per)


def main():
    cfg = LlamaConfig(**B.CONFIGS["small"])
    model = LlamaForCausalLM(cfg)
    key = jax.random.key(0)
    ids = jax.random.randint(key, (8, 256), 0, cfg.vocab_size, jnp.int32)
    base = model.init(key, ids[:, :8])["params"]
    tr, fr = lj.split(lj.lorafy(base, rank=8, alpha=16.0, targets=B.TARGETS, key=key))
    tx = optax.adamw(1e-4)
    apply = lj.lora(model.apply)
    full = jax.jit(B.adam_step(tx, lambda p, i: B.ce_loss(model.apply({"params": p}, i), i)))
    ours = jax.jit(B.adam_step(
        tx, lambda t, f, i: B.ce_loss(apply({"params": lj.combine(t, f)}, i), i)))
    out = {"full": profile(full, (base, tx.init(base), ids)),
           "lora": profile(ours, (tr, tx.init(tr), fr, ids))}
    for name, per in out.items():
        tot = sum(per.values())
        print(f"{name:5s} " + ", ".join(f"{k} {v:.0f} ms ({100 * v / tot:.0f}%)"
                                        for k, v in sorted(per.items(), key=lambda kv: -kv[1])))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile_step.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
