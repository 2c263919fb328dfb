#!/usr/bin/env bash
# The device check, in one go on a GPU machine (H100/H200), with no network: the machine's python3 must have
# torch, triton, numpy, safetensors, pytest, scikit-build-core and pybind11 (the workplace's CUDA image does;
# elsewhere put wheels of what is missing in ./wheels). Steps: build with PYSOUP_CUDA=ON (archs 80 and 90),
# the GPU tests (kernels, pysoup._cuda, merges with device="cuda" against the CPU backend's bytes), the GPU
# benchmarks. Each step's log and the results (benchmarks/results/gpu-<gpu name>.{json,md}) go to $OUT when it
# is set. A failing step does not stop the later ones; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PY=${PYTHON:-python3}
LOGS=${OUT:-benchmarks/results}
mkdir -p "$LOGS"
failed=()
step() {  # step NAME COMMAND...: runs it, logs to $LOGS/NAME.log, records a failure
  local name=$1
  shift
  echo "== $name ($(( $(date +%s) - start )) s)"
  if ! "$@" 2>&1 | tee "$LOGS/$name.log"; then failed+=("$name"); fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
if [ -d wheels ]; then "$PY" -m pip install -q --no-index --find-links wheels --no-deps wheels/*.whl; fi

step build "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
  -Ccmake.define.PYSOUP_CUDA=ON "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-80;90}"
"$PY" -c "import pysoup, pysoup._cuda, pysoup.kernels; print(pysoup.info())" || failed+=(import)

# The kernels and device merges on the GPU against the CPU backend (the interpreter off; _cuda must be used).
step gpu-tests timeout ${TEST_TIMEOUT:-240} env TRITON_INTERPRET=0 PYSOUP_REQUIRE_CUDA_MODULE=1 \
  "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_triton.py tests/test_device.py
step gpu-bench timeout ${BENCH_TIMEOUT:-300} env TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 "$PY" benchmarks/gpu_bench.py ${GPU_BENCH_ARGS:-}
if [ -n "${OUT:-}" ]; then cp benchmarks/results/gpu-* "$OUT"/ 2>/dev/null; fi
# OffloadedEMA (issue 11): its averages against the on-device EMA's bytes, then the training-step overhead of no EMA,
# the on-device EMA, OffloadedEMA and a synchronous offload on a 100M-parameter model
# (benchmarks/results/training-gpu-<gpu name>.{json,md}).
step offload-tests timeout ${TEST_TIMEOUT:-240} env TRITON_INTERPRET=0 \
  "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_offload.py
step training-bench timeout ${BENCH_TIMEOUT:-300} env TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 "$PY" benchmarks/training.py --gpu
if [ -n "${OUT:-}" ]; then cp benchmarks/results/training-gpu-* "$OUT"/ 2>/dev/null; fi
echo "gpu_check: $(( $(date +%s) - start )) s; failed: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
