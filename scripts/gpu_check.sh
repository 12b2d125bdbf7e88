#!/usr/bin/env bash
# GPU checks and benchmarks (run on a CUDA machine): CUDA tests, then benchmark JSON into $1 (default bench_out).
# Each step has its own time limit (seconds, T_<STEP> to change), so one slow step cannot eat a lease.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench_out}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 BENCH_OUT="$OUT_DIR"
PY=${PY:-python3}
step() { local t=$1; shift; echo "== $* (limit ${t}s)" >&2; local s=$SECONDS; timeout "$t" "$@"; echo "== rc $? in $((SECONDS - s))s" >&2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/gpu.txt"
# CUDA tests: kernels, factorized layers, shared-input GEMMs, throughput counters, federated clients on the GPU
step "${T_TESTS:-180}" $PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_lowrank_core.py \
  tests/test_shared_input.py tests/test_throughput.py "tests/test_compute_device.py::test_a_client_trains_on_the_gpu_and_replies_on_the_cpu" \
  "tests/test_compute_device.py::test_the_device_rule" 2>&1 | tee "$OUT_DIR/tests.log" | tail -8
step "${T_FED:-90}" $PY benchmarks/bench_fed_device.py > /dev/null
step "${T_KERNELS:-90}" $PY benchmarks/bench_kernels.py > /dev/null
step "${T_LAYER:-90}" $PY benchmarks/bench_lowrank_layer.py --kernel > /dev/null   # bf16, d in 1024 2048 4096, 8192 tokens
[ "${SKIP_E2E:-0}" = 1 ] || step "${T_E2E:-240}" $PY benchmarks/bench_inrank_gpt2.py --size medium --compile ${E2E_ARGS:-} > /dev/null
[ "${SKIP_E2E:-0}" = 1 ] || step "${T_E2E:-240}" $PY benchmarks/bench_inrank_gpt2.py --arch llama --size 350m --compile ${E2E_ARGS:-} > /dev/null
ls -la "$OUT_DIR"
