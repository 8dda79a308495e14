#!/usr/bin/env bash
# One prepared device check (NVIDIA H200; the image has jax[cuda], flax, optax, orbax).
# bf16 LoRA vs QLoRA-NF4 vs hand-written LoRA on a ~1.1B Llama: tokens/s, MFU, peak memory;
# the run checks its own figures and exits 1 when one is implausible. A few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps -e . 2>/dev/null || true
python -c "import jax; print(jax.__version__, jax.devices())"
out="${OUT:-experiments/results}"
mkdir -p "$out"
python -m experiments.bench_gpu --out "$out/bench_gpu.json" "$@"
