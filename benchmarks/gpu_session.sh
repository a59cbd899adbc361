#!/usr/bin/env bash
# One device call for the one-GPU checks of the memory options, HF models and MFU (results: $OUT/results.tgz,
# plus the short summary on stdout). Each part has its own time limit, most important first:
#   1. the longest recipe through train.py (recipes/longest_1gpu.yaml: 1,048,576 tokens, 3 steps)
#   2. `python train.py` with the GPU defaults (the README's command; 30 steps)
#   3. a Hugging Face Llama of the 350m shapes through HFCausalLM vs its own sdpa (128K tokens)
#   4. the recipe's logged perf/mfu next to bench_model.py's step (benchmarks/recipe_mfu.py)
#   5. 2,097,152 byte tokens, checkpointing=offload with 3 blocks per saved input, one step
# Usage: OUT=results bash benchmarks/gpu_session.sh   (hydra-core/omegaconf/datasets installed; logger=csv)
set -u
OUT=${OUT:?set OUT to a results folder}
R=/tmp/gpu_session; rm -rf "$R"; mkdir -p "$R"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$R/gpu.txt"
git rev-parse --short HEAD > "$R/commit.txt" 2>/dev/null || cat COMMIT.txt > "$R/commit.txt" 2>/dev/null
DEADLINE=$((SECONDS + ${BUDGET_S:-550}))  # the device call's limit is 600 s: results must be packed before
part() { local name=$1 limit=$2; shift 2; local t0=$SECONDS left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then echo "== $name: skipped (no time left)"; return; fi
  timeout "$limit" "$@" > "$R/$name.log" 2>&1; echo "rc=$? wall=$((SECONDS - t0))s limit=${limit}s" >> "$R/$name.log"
  echo "== $name: $(tail -1 "$R/$name.log")"; tar czf "$OUT/results.tgz" --exclude="*.ckpt" --exclude="checkpoints" --exclude="wandb" -C "$R" . ; }

part longest_recipe 240 python train.py -cd recipes -cn longest_1gpu logger=csv trainer.max_steps=3 \
  trainer.val_check_interval=3 hydra.run.dir=/tmp/longest_recipe
cp /tmp/longest_recipe/metrics.jsonl "$R/longest_recipe_metrics.jsonl" 2>/dev/null
grep -E "memory estimate|step [0-9]+/|val/loss|final|peak|Error|error" "$R/longest_recipe.log" | tail -12
rm -rf /tmp/longest_recipe/checkpoints
part train_default 90 python train.py logger=csv trainer.max_steps=30 trainer.val_check_interval=30 \
  trainer.log_every_n_steps=1 hydra.run.dir=/tmp/train_default
cp /tmp/train_default/metrics.jsonl "$R/train_default_metrics.jsonl" 2>/dev/null
tail -4 "$R/train_default.log"
part bench_hf 120 python benchmarks/bench_hf.py --steps 2 --json "$R/bench_hf.json"
tail -6 "$R/bench_hf.log"
if [ -f benchmarks/recipe_mfu.py ]; then
  part recipe_mfu 170 python benchmarks/recipe_mfu.py --steps 12 --window 5 --bench-steps 2 --out "$R"
  tail -6 "$R/recipe_mfu.log"
fi
part longest_2m 150 python benchmarks/bench_memory.py --suite longest --longest 350m:259:all-k3:2097152 \
  --longest-steps 1 --out "$R" --name longest_2m
tail -2 "$R/longest_2m.log"
tar czf "$OUT/results.tgz" --exclude="*.ckpt" --exclude="checkpoints" --exclude="wandb" -C "$R" .
