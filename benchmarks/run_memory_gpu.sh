#!/usr/bin/env bash
# Issue 19's GPU figures in two device calls (results under $OUT):
#   OUT=results bash benchmarks/run_memory_gpu.sh short   # GPU tests of the options, slopes at 32K/64K
#   OUT=results bash benchmarks/run_memory_gpu.sh long    # cost at 128K, slopes at 64K/128K, the target lengths
#   OUT=results bash benchmarks/run_memory_gpu.sh reach   # 2M byte tokens, each option's cost (tile and chunk sizes)
set -u
OUT=${OUT:?set OUT to a results folder}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
B="python benchmarks/bench_memory.py --out $OUT"
case "${1:-short}" in
  short)
    timeout 120 python -m pytest -q -p no:cacheprovider tests/gpu/test_memory_gpu.py > "$OUT/pytest_memory_gpu.log" 2>&1
    echo "rc=$?" >> "$OUT/pytest_memory_gpu.log"; tail -3 "$OUT/pytest_memory_gpu.log"
    timeout 420 $B --suite slopes --name slopes_32k 2>&1 | tee "$OUT/slopes_32k.log" | tail -16
    ;;
  long)
    timeout 140 $B --suite cost --cost-steps 2 --name cost_128k \
      --cost 350m:128256:full,350m:128256:tiles,350m:128256:offload,350m:128256:all 2>&1 | tee "$OUT/cost_128k.log" | tail -5
    timeout 130 $B --suite slopes --lengths 65536,131072 --name slopes_128k \
      --slopes 350m:259:all,350m:128256:all,350m:259:hf-gc-offload 2>&1 | tee "$OUT/slopes_128k.log" | tail -4
    timeout 310 $B --suite longest --name longest 2>&1 | tee "$OUT/longest.log" | tail -4
    ;;
  reach)
    timeout 150 $B --suite longest --longest 350m:259:all-k3:2097152 --longest-steps 1 --name longest_2m \
      2>&1 | tee "$OUT/longest_2m.log" | tail -2
    timeout 60 python -m pytest -q -p no:cacheprovider tests/gpu/test_memory_gpu.py > "$OUT/pytest_memory_gpu.log" 2>&1
    echo "rc=$?" >> "$OUT/pytest_memory_gpu.log"; tail -2 "$OUT/pytest_memory_gpu.log"
    timeout 60 $B --suite cost --cost-len 32768 --cost-steps 4 --name cost_loss_32k \
      --cost 350m:128256:full-logits,350m:128256:full,350m:128256:full+c4096,350m:128256:full+c8192 \
      2>&1 | tee "$OUT/cost_loss_32k.log" | tail -4
    timeout 190 $B --suite cost --cost-steps 3 --name cost_128k \
      --cost 350m:128256:full,350m:128256:tiles,350m:128256:tiles+t32768,350m:128256:offload \
      2>&1 | tee "$OUT/cost_128k.log" | tail -4
    ;;
esac
