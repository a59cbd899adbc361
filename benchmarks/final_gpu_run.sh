#!/usr/bin/env bash
# Second device call: block_sparse GPU parity (new varlen kernel), the variants/density
# benchmark, and the strategy's compression hooks on NCCL. Results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export OUT="${OUT:-$PWD/bench_out}"; mkdir -p "$OUT"
python3 -c "import lightning" 2>/dev/null || export PYTHONPATH="$PWD/.carry/site"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout -k 10 90 python3 -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/gpu_parity.py \
  --variants block_sparse 2>&1 | tail -25 | tee "$OUT/gpu_parity_block_sparse.log"
timeout -k 10 170 python3 -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/bench_variants.py \
  --budget-s 110 2>&1 | tee "$OUT/bench_variants.log" | tail -30
# per-rank tensors go 3 folders down (not fetched); the report is copied up
timeout -k 10 150 python3 tests/distributed/_strategy_gpu_check.py "$OUT/s/t/u" --parts compression 2>&1 | tail -30 \
  | tee "$OUT/strategy_compression_nccl.log"
cp "$OUT/s/t/u/strategy_gpu_check.json" "$OUT/" 2>/dev/null; rm -rf "$OUT/s"
