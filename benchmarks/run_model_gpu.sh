#!/usr/bin/env bash
# One GPU, one command: train.py as the README writes it, the GPU test tier, then the
# reference model's speed table (benchmarks/bench_model.py). Results under $OUT.
#
#   bash benchmarks/run_model_gpu.sh                 # from the repository root
#   STAGES="bench" BENCH_ARGS="--longest 350m:full:524288" bash benchmarks/run_model_gpu.sh
#
# Environment: OUT (default ./bench_out), STAGES (any of: train tests bench longest recipe; default
# the first three; recipe: benchmarks/recipe_mfu.py, a recipe's logged MFU next to the bare step,
# RECIPE_ARGS its flags), BENCH_ARGS (extra bench_model.py flags), LONGEST (space-separated
# preset:checkpointing:len1,len2 lists for the longest-sequence search). Packages missing on the machine (hydra-core,
# omegaconf, antlr4, datasets, dill, multiprocess) are installed from ./.whl when present.
# wandb is not on the lent GPU image, so train.py runs with logger=csv there.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-$PWD/bench_out}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled NCCL_NVLS_ENABLE=0
mkdir -p "$OUT"
if [ -d .whl ] && ! python3 -c "import hydra, datasets" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES=${STAGES:-"train tests bench"}
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__, 'cudnn', torch.backends.cudnn.version())"
  git log -1 --format='commit %H' 2>/dev/null; } 2>&1 | tee "$OUT/env.txt"
rc=0
if [[ $STAGES == *train* ]]; then
  echo "=== python train.py logger=csv (the README's main job) ==="
  timeout -k 10 240 python3 train.py logger=csv hydra.run.dir="$OUT/run_default" 2>&1 | tail -25 | tee "$OUT/train_default.log"
  rc=$((rc | PIPESTATUS[0]))
  cp "$OUT/run_default/csv/version_0/metrics.csv" "$OUT/train_default_metrics.csv" 2>/dev/null
  rm -rf "$OUT/run_default"
fi
if [[ $STAGES == *tests* ]]; then
  echo "=== pytest tests/gpu ==="
  timeout -k 10 300 python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/gpu} 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
  rc=$((rc | PIPESTATUS[0]))
fi
if [[ $STAGES == *bench* ]]; then
  echo "=== benchmarks/bench_model.py ${BENCH_ARGS:-} ==="
  timeout -k 10 "${BENCH_TIMEOUT:-400}" python3 benchmarks/bench_model.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_model.log" | grep -v "^{'kind'"
  rc=$((rc | PIPESTATUS[0]))
fi
if [[ $STAGES == *longest* ]]; then  # one training step per length, ascending, until OOM
  for spec in ${LONGEST:-350m:full:262144,524288}; do
    echo "=== longest trainable: $spec ==="
    mkdir -p "$OUT/longest_${spec%%:*}"
    timeout -k 10 "${LONGEST_TIMEOUT:-300}" python3 benchmarks/bench_model.py --out "$OUT/longest_${spec%%:*}" \
      --configs "" --attention "" --optimizer "" --longest "$spec" 2>&1 | grep -v "^{'kind'" | tail -4
    rc=$((rc | PIPESTATUS[0]))
  done
fi
if [[ $STAGES == *recipe* ]]; then  # the recipe's logged perf/mfu next to bench_model.py's step (same module, same batch)
  echo "=== benchmarks/recipe_mfu.py ${RECIPE_ARGS:-} ==="
  timeout -k 10 "${RECIPE_TIMEOUT:-540}" python3 benchmarks/recipe_mfu.py --out "$OUT" ${RECIPE_ARGS:-} 2>&1 | tee "$OUT/recipe_mfu.log" | grep -v "^{'kind'"
  rc=$((rc | PIPESTATUS[0]))
fi
echo "=== exit: $rc; files in $OUT ==="
exit $rc
