#!/usr/bin/env bash
# GPU checks and benchmarks (run on a CUDA machine): kernel tests, then benchmark JSON into $1 (default bench_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench_out}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 BENCH_OUT="$OUT_DIR"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT_DIR/gpu.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT_DIR/gpu.txt"
$PY -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_lowrank_core.py tests/test_shared_input.py tests/test_throughput.py 2>&1 | tee "$OUT_DIR/tests.log" | tail -5
$PY benchmarks/bench_kernels.py > /dev/null
$PY benchmarks/bench_lowrank_layer.py --kernel > /dev/null           # bf16, d in 1024 2048 4096, 8192 tokens
[ "${SKIP_E2E:-0}" = 1 ] || $PY benchmarks/bench_inrank_gpt2.py --size medium --compile ${E2E_ARGS:-} > /dev/null
[ "${SKIP_E2E:-0}" = 1 ] || $PY benchmarks/bench_inrank_gpt2.py --arch llama --size 350m --compile ${E2E_ARGS:-} > /dev/null
ls -la "$OUT_DIR"
