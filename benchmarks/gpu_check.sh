#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): real-dimension Qwen2.5-VL-3B and InternVL-2B with random weights, 3 bf16
# LoRA steps with the paper configs, the vLLM engine for real, HF-vs-vLLM log-probs, tokens/s. No downloads.
# Writes benchmarks/results/gpu_check.json; on a machine without CUDA it says so and exits 0 without writing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
exec timeout "${GPU_CHECK_TIMEOUT:-480}" "$PY" benchmarks/gpu_check.py "$@"
