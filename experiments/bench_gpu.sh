#!/usr/bin/env bash
# One prepared device check (NVIDIA H200; the image has jax[cuda], flax, optax, orbax, torch, peft).
# bf16 LoRA vs QLoRA-NF4 tokens/s and MFU on a ~1.1B Llama; finishes in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --no-deps -e . 2>/dev/null || true
python -c "import jax; print(jax.__version__, jax.devices())"
python -m experiments.bench_gpu "$@"
mkdir -p "${OUT:-experiments/results}"
cp experiments/results/bench_gpu.json "${OUT:-experiments/results}/" 2>/dev/null || true
