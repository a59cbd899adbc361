#!/usr/bin/env bash
# Issue 19's GPU figures in one or two device calls (results under $OUT):
#   OUT=results bash benchmarks/run_memory_gpu.sh short   # GPU tests of the options, slopes, cost at 128K
#   OUT=results bash benchmarks/run_memory_gpu.sh long    # whole steps at the target lengths
set -u
OUT=${OUT:?set OUT to a results folder}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null || true
case "${1:-short}" in
  short)
    timeout 120 python -m pytest -q -p no:cacheprovider tests/gpu/test_memory_gpu.py > "$OUT/pytest_memory_gpu.log" 2>&1
    echo "rc=$?" >> "$OUT/pytest_memory_gpu.log"; tail -3 "$OUT/pytest_memory_gpu.log"
    timeout 420 python benchmarks/bench_memory.py --suite slopes,cost --out "$OUT" 2>&1 | tee "$OUT/bench_memory_short.log" | tail -30
    ;;
  long)
    timeout 560 python benchmarks/bench_memory.py --suite longest --out "$OUT" "${@:2}" 2>&1 | tee "$OUT/bench_memory_long.log" | tail -12
    ;;
esac
