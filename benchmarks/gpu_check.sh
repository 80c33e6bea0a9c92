#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): one training step of the HF captioner at Qwen2.5-VL-3B and InternVL-2B
# dimensions with random weights and the paper's shapes (32 problems x 8 captions x 512 tokens, ~1k visual tokens,
# LoRA r 128), memory capped to 80 GB. No downloads. Writes benchmarks/results/gpu_check.json after every phase.
# Without CUDA: one line on stderr, exit 2, nothing written. --dry-run: the same phases on CPU at tiny dimensions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT:-570}" "$PY" benchmarks/gpu_check.py "$@"
