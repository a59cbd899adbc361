#!/usr/bin/env bash
# The one command for a lent GPU machine (2 GPUs): parity first (tests/gpu/gpu_parity.py),
# then the benchmark.
#
#   bash benchmarks/run_all.sh            # from the repository root; results under $OUT
#
# Environment: OUT (results folder, default ./bench_out), NPROC (GPUs, default 2),
# PYTHON (default python3), PARITY_TIMEOUT / BENCH_TIMEOUT (hard limits in seconds),
# BENCH_ARGS / PARITY_ARGS (extra flags), DRY_RUN=1 (CPU + gloo smoke test of both
# scripts, no GPU needed). Both steps always run; the exit status is
# non-zero if either failed. Nothing is installed: ring_lightning is imported from the
# checkout through PYTHONPATH (no hydra-core / datasets needed).
set -uo pipefail
cd "$(dirname "$0")/.."

# NVLink multicast stays off on shared hosts (device notes); NCCL errors abort instead of hanging.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-$PWD/bench_out}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DRY=""
if [ "${DRY_RUN:-0}" = "1" ]; then DRY="--dry-run"; export OMP_NUM_THREADS=1; fi
NPROC=${NPROC:-2}
PARITY_TIMEOUT=${PARITY_TIMEOUT:-150}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-390}

{
  date -u
  [ -z "$DRY" ] && nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu \
    --format=csv 2>&1
  [ -z "$DRY" ] && nvidia-smi topo -m 2>&1
  $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpus', torch.cuda.device_count())" 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

echo "=== gpu_parity (timeout ${PARITY_TIMEOUT}s) ==="
timeout -k 15 "$PARITY_TIMEOUT" $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  tests/gpu/gpu_parity.py $DRY ${PARITY_ARGS:-} 2>&1 | tee "$OUT/gpu_parity.log"
rc_parity=${PIPESTATUS[0]}

echo "=== bench_attention (timeout ${BENCH_TIMEOUT}s) ==="
timeout -k 15 "$BENCH_TIMEOUT" $PY -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
  benchmarks/bench_attention.py $DRY ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_attention.log"
rc_bench=${PIPESTATUS[0]}

# the bench table is the last thing the bench printed; repeat the parity verdict under it
grep -h "^PARITY " "$OUT/gpu_parity.log" || echo "PARITY: no verdict (crashed or timed out; see gpu_parity.log)"
echo "=== exit codes: gpu_parity=$rc_parity bench_attention=$rc_bench (124/137 = timed out); files in $OUT ==="
[ "$rc_parity" -eq 0 ] && [ "$rc_bench" -eq 0 ]
