#!/usr/bin/env bash
# The device check, in one go on a GPU machine (H100/H200), no network needed when the machine has
# torch + triton (or wheels of them sit in ./wheels): build, the GPU tests, the GPU benchmarks.
# Results: benchmarks/results/gpu-<gpu name>.{json,md}; a copy goes to $OUT when that is set.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

# An environment with torch and triton: the machine's own if it has them, else from local wheels.
if ! "$PY" -c "import torch, triton" 2>/dev/null; then
  "$PY" -m venv --system-site-packages .venv-gpu
  PY=.venv-gpu/bin/python
  "$PY" -m pip install -q --no-index --find-links wheels torch triton numpy tqdm safetensors pytest pyyaml hypothesis
fi
"$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>/dev/null \
  || "$PY" -m pip install -q --no-deps -e .

# GPU tests: the kernels on CUDA tensors against the CPU reference (the interpreter is switched off).
TRITON_INTERPRET=0 "$PY" -m pytest -q -m gpu tests/test_triton.py

# Benchmarks (--quick when less than 8 minutes would otherwise be too tight).
TRITON_INTERPRET=0 "$PY" benchmarks/gpu_bench.py ${GPU_BENCH_ARGS:-}
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu-* "$OUT"/; fi
echo "gpu_check: $(( $(date +%s) - start )) s"
