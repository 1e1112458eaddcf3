#!/bin/bash
# One device call for the low-latency family (2 GPUs): install, GPU tests, benchmark; logs -> $OUT.
#   bash benchmarks/low_latency_gpu.sh [test_timeout_s] [bench_timeout_s] [bench args...]
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export EPKERN_CACHE_DIR=${EPKERN_CACHE_DIR:-/tmp/epkern-cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
TEST_T=${1:-150}; BENCH_T=${2:-110}; shift 2 2>/dev/null
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
python3 -c "import epkern.codegen as c; print(c.__file__)" || exit 1
set -o pipefail
timeout "$TEST_T" python3 -m pytest -q -x -p no:cacheprovider tests/test_low_latency_gpu.py 2>&1 | tee "$OUT/test.log" | tail -60
echo "test rc=$?"
timeout "$BENCH_T" python3 -m benchmarks.low_latency --num-sms 64 --name low_latency_sms64 > "$OUT/bench64.log" 2>&1
echo "bench64 rc=$?"
timeout "$BENCH_T" python3 -m benchmarks.low_latency "$@" 2>&1 | tee "$OUT/bench.log" | tail -40
echo "bench rc=$?"
cp benchmarks/results/low_latency*.json "$OUT/" 2>/dev/null || true
