#!/usr/bin/env bash
# One device call for the one-GPU checks (results: $OUT/results.tgz, plus a short summary on stdout).
# PARTS picks which run, in the order given (default: all, most important first); each has its own limit:
#   longest_2m      2,097,152 byte tokens, checkpointing=offload, 3 blocks per saved input, one step (bench_memory)
#   cost_128k       tokens/s of full, + tiles, + offload, all of them, at 128K (V = 128256)
#   bench_hf        a Hugging Face Llama of the 350m shapes through HFCausalLM vs its own sdpa (128K tokens)
#   train_hf        the same model through `python train.py model=hf` at 128K tokens, 4 steps
#   longest_recipe  recipes/longest_1gpu.yaml through train.py (1,048,576 tokens, 3 steps)
#   recipe_2m       the 2M byte-token run through train.py (recipes/longest_bytes_1gpu.yaml, 2 steps)
#   train_default   `python train.py` with the GPU defaults (the README's command; 30 steps)
#   recipe_mfu      the recipe's logged perf/mfu next to bench_model.py's step (benchmarks/recipe_mfu.py)
#   estimate        the pre-flight's memory estimate against measured peaks (check_memory_estimate.py)
#   fsdp_3b         recipes/fsdp_3b_offload_1gpu.yaml through train.py (3.6B model, 163,840 tokens, model
#                   state on the host; 3 steps, no checkpoint written: 43 GiB each)
#   ddp_3b          the same under strategy=ring (DDP): the pre-flight's verdict, then the run with it off
#   hf_fsdp         a Hugging Face Llama of LLaMA-3.2-3B's shapes through `train.py model=hf strategy=ring_fsdp`
#                   with the model state on the host, 65,536 tokens, 2 steps
#   fsdp_resume     the 350m preset (V = 128256) under ring_fsdp (state on the host): 2 steps and a folder of shards, then
#                   `resume=true` to step 3 (the GPU's NCCL path of the sharded save and load)
#   fsdp_3b_offload the 3b recipe with checkpointing=offload too (one saved input per 4 blocks on the host), 2 steps
#   fsdp_offload_parity  the 350m preset at 32,768 tokens, 6 steps, under strategy=ring (DDP), ring_fsdp and
#                   ring_fsdp with the model state on the host: the per-step losses side by side
#   fsdp_3b_resume  the 3b recipe: 2 steps and a folder of shards (one, ~40 GiB), then resume=true to step 3
#                   (the step-3 loss of the uninterrupted run: call2_a644dc6 in results/2026-12-02-h200x1-fsdp)
#   fsdp_no_room    fsdp_resume's run on a disk filled to leave ~10 GiB: the step-2 folder (7 GiB) fits, the final
#                   save of step 3 does not: the refusal, what the folder holds after, the newest complete checkpoint
# Usage: OUT=results PARTS="longest_2m bench_hf" bash benchmarks/gpu_session.sh
#        (hydra-core/omegaconf/datasets installed; logger=csv: the device image has no wandb)
set -u
OUT=${OUT:?set OUT to a results folder}
R=/tmp/gpu_session; rm -rf "$R"; mkdir -p "$R"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$R/gpu.txt"
(cat COMMIT.txt 2>/dev/null || git rev-parse --short HEAD) > "$R/commit.txt"  # the device copy's git HEAD can be stale
DEADLINE=$((SECONDS + ${BUDGET_S:-550}))  # the device call's limit is 600 s: results must be packed before
pack() { tar czf "$OUT/results.tgz" --exclude="*.ckpt" --exclude="checkpoints" --exclude="wandb" -C "$R" . ; }
part() { local name=$1 limit=$2; shift 2; local t0=$SECONDS left=$((DEADLINE - SECONDS))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then echo "== $name: skipped (no time left)"; return; fi
  timeout "$limit" "$@" > "$R/$name.log" 2>&1; echo "rc=$? wall=$((SECONDS - t0))s limit=${limit}s" >> "$R/$name.log"
  echo "== $name: $(tail -1 "$R/$name.log")"; pack; }
B="python benchmarks/bench_memory.py --out $R"
F3B="python train.py -cd recipes -cn fsdp_3b_offload_1gpu logger=csv callbacks.model_checkpoint=null \
  callbacks.final_checkpoint=null +trainer.enable_checkpointing=false"
DDP3B="strategy=ring ~strategy.offload_params ~strategy.save_distributed_checkpoint"
HF3B='{model_type: llama, vocab_size: 128256, hidden_size: 3072, intermediate_size: 8192, num_hidden_layers: 28, num_attention_heads: 24, num_key_value_heads: 8, head_dim: 128, rope_theta: 500000.0, rms_norm_eps: 1e-05, max_position_embeddings: 131072, tie_word_embeddings: true}'
HF350='{model_type: llama, vocab_size: 259, hidden_size: 1024, intermediate_size: 3584, num_hidden_layers: 24, num_attention_heads: 16, num_key_value_heads: 8, head_dim: 64, rope_theta: 500000.0, rms_norm_eps: 1e-05, max_position_embeddings: 131072, tie_word_embeddings: false}'

for p in ${PARTS:-longest_2m cost_128k bench_hf train_hf longest_recipe train_default recipe_mfu estimate}; do case $p in
  longest_2m)
    part longest_2m 150 $B --suite longest --longest 350m:259:all-k3:2097152 --longest-steps 1 --name longest_2m
    tail -2 "$R/longest_2m.log" ;;
  cost_128k)
    part cost_128k 200 $B --suite cost --cost-steps 4 --name cost_128k \
      --cost "${COST_SPECS:-350m:128256:full,350m:128256:tiles,350m:128256:offload,350m:128256:all}"
    grep "^| cost" "$R/cost_128k.log" ;;
  bench_hf)
    part bench_hf 120 python benchmarks/bench_hf.py --steps 2 --json "$R/bench_hf.json"
    tail -6 "$R/bench_hf.log" ;;
  train_hf)
    part train_hf 150 python train.py experiment=base_gpu model=hf "model.config=$HF350" model.checkpointing=full \
      data.seq_len=131072 data.max_tokens=2000000 data.return_document_ids=false logger=csv trainer.max_steps=4 \
      trainer.val_check_interval=4 trainer.limit_val_batches=1 trainer.log_every_n_steps=1 model.export_dir=null \
      hydra.run.dir=/tmp/train_hf
    cp /tmp/train_hf/metrics.jsonl "$R/train_hf_metrics.jsonl" 2>/dev/null
    grep -E "step [0-9]+/|final|Error" "$R/train_hf.log" | tail -6 ;;
  longest_recipe)
    part longest_recipe 240 python train.py -cd recipes -cn longest_1gpu logger=csv trainer.max_steps=3 \
      trainer.val_check_interval=3 hydra.run.dir=/tmp/longest_recipe
    cp /tmp/longest_recipe/metrics.jsonl "$R/longest_recipe_metrics.jsonl" 2>/dev/null
    grep -E "memory estimate|step [0-9]+/|val/loss|final|peak|Error|error" "$R/longest_recipe.log" | tail -12 ;;
  recipe_2m)
    part recipe_2m ${RECIPE_2M_S:-300} python train.py -cd recipes -cn longest_bytes_1gpu logger=csv trainer.max_steps=2 \
      trainer.val_check_interval=2 hydra.run.dir=/tmp/recipe_2m
    cp /tmp/recipe_2m/metrics.jsonl "$R/recipe_2m_metrics.jsonl" 2>/dev/null
    grep -E "memory estimate|step [0-9]+/|val/loss|final|peak|Error|error" "$R/recipe_2m.log" | tail -12 ;;
  train_default)
    part train_default 90 python train.py logger=csv trainer.max_steps=30 trainer.val_check_interval=30 \
      trainer.log_every_n_steps=1 hydra.run.dir=/tmp/train_default
    cp /tmp/train_default/metrics.jsonl "$R/train_default_metrics.jsonl" 2>/dev/null
    tail -4 "$R/train_default.log" ;;
  recipe_mfu)
    part recipe_mfu 170 python benchmarks/recipe_mfu.py --steps 12 --window 5 --bench-steps 2 --out "$R"
    tail -6 "$R/recipe_mfu.log" ;;
  estimate)
    part estimate 150 python benchmarks/check_memory_estimate.py --out "$R"
    tail -12 "$R/estimate.log" ;;
  fsdp_3b)
    (while sleep 5; do free -m | awk '/Mem:/{print $3}'; done) > "$R/fsdp_3b_host_used_mb.log" 2>&1 & SAMPLER=$!
    part fsdp_3b ${FSDP_3B_S:-400} $F3B trainer.max_steps=3 trainer.val_check_interval=3 hydra.run.dir=/tmp/fsdp_3b
    kill $SAMPLER; cp /tmp/fsdp_3b/metrics.jsonl "$R/fsdp_3b_metrics.jsonl" 2>/dev/null
    echo "host used MiB (max of 5 s samples): $(sort -n "$R/fsdp_3b_host_used_mb.log" | tail -1)"
    grep -E "memory estimate|step [0-9]+/|val/loss|final|Error|error" "$R/fsdp_3b.log" | tail -12 ;;
  fsdp_3b_offload)
    part fsdp_3b_offload 300 $F3B checkpointing=offload model.blocks_per_checkpoint=4 trainer.max_steps=2 \
      trainer.val_check_interval=2 hydra.run.dir=/tmp/fsdp_3b_offload
    cp /tmp/fsdp_3b_offload/metrics.jsonl "$R/fsdp_3b_offload_metrics.jsonl" 2>/dev/null
    grep -E "memory estimate|step [0-9]+/|val/loss|final|Error|error" "$R/fsdp_3b_offload.log" | tail -8 ;;
  hf_fsdp)
    part hf_fsdp 240 python train.py experiment=base_gpu model=hf "model.config=$HF3B" model.checkpointing=full \
      strategy=ring_fsdp strategy.offload_params=true data.seq_len=65536 data.max_tokens=400000 \
      data.return_document_ids=false logger=csv trainer.max_steps=2 trainer.val_check_interval=2 \
      trainer.limit_val_batches=1 trainer.log_every_n_steps=1 model.export_dir=null callbacks.model_checkpoint=null \
      callbacks.final_checkpoint=null +trainer.enable_checkpointing=false hydra.run.dir=/tmp/hf_fsdp
    cp /tmp/hf_fsdp/metrics.jsonl "$R/hf_fsdp_metrics.jsonl" 2>/dev/null
    grep -E "step [0-9]+/|val/loss|final|Error|error" "$R/hf_fsdp.log" | tail -6 ;;
  fsdp_resume)
    FR="python train.py experiment=base_gpu model=350m model.vocab_size=128256 checkpointing=full strategy=ring_fsdp
      strategy.offload_params=true strategy.save_distributed_checkpoint=true data.seq_len=65536 data.max_tokens=600000
      logger=csv trainer.val_check_interval=2 trainer.limit_val_batches=1 trainer.log_every_n_steps=1
      callbacks.model_checkpoint.every_n_train_steps=2 hydra.run.dir=/tmp/fsdp_resume"
    part fsdp_resume_a 150 $FR trainer.max_steps=2
    ls -la /tmp/fsdp_resume/checkpoints/ /tmp/fsdp_resume/checkpoints/last.ckpt >> "$R/fsdp_resume_a.log" 2>&1
    part fsdp_resume_b 150 $FR trainer.max_steps=3 resume=true
    cp /tmp/fsdp_resume/metrics.jsonl "$R/fsdp_resume_metrics.jsonl" 2>/dev/null
    grep -E "resumed|step [0-9]+/|final|Error|error" "$R/fsdp_resume_a.log" "$R/fsdp_resume_b.log" | tail -10 ;;
  fsdp_offload_parity)
    PP="python train.py experiment=base_gpu model=350m checkpointing=full data.seq_len=32768 data.max_tokens=600000
      logger=csv trainer.max_steps=6 trainer.val_check_interval=6 trainer.limit_val_batches=1 trainer.log_every_n_steps=1
      callbacks.model_checkpoint=null callbacks.final_checkpoint=null +trainer.enable_checkpointing=false"
    part parity_ddp 120 $PP strategy=ring hydra.run.dir=/tmp/parity_ddp
    part parity_fsdp 120 $PP strategy=ring_fsdp hydra.run.dir=/tmp/parity_fsdp
    part parity_offload 120 $PP strategy=ring_fsdp strategy.offload_params=true hydra.run.dir=/tmp/parity_offload
    python benchmarks/compare_losses.py /tmp/parity_{ddp,fsdp,offload}/metrics.jsonl | tee "$R/parity.txt"
    for r in ddp fsdp offload; do cp /tmp/parity_$r/metrics.jsonl "$R/parity_${r}_metrics.jsonl" 2>/dev/null; done ;;
  fsdp_3b_resume)
    (while sleep 5; do free -m | awk '/Mem:/{print $3}'; done) > "$R/fsdp_3b_resume_host_used_mb.log" 2>&1 & SAMPLER=$!
    FR="python train.py -cd recipes -cn fsdp_3b_offload_1gpu logger=csv trainer.val_check_interval=2
      trainer.limit_val_batches=1 callbacks.model_checkpoint.every_n_train_steps=2 callbacks.model_checkpoint.save_top_k=0
      hydra.run.dir=/tmp/fsdp_3b_resume"
    part fsdp_3b_resume_a 300 $FR trainer.max_steps=2
    { du -sh /tmp/fsdp_3b_resume/checkpoints/*; ls -la --time-style=+%T /tmp/fsdp_3b_resume/checkpoints/*; } >> "$R/fsdp_3b_resume_a.log" 2>&1
    df -h /tmp >> "$R/fsdp_3b_resume_a.log" 2>&1
    part fsdp_3b_resume_b 260 $FR trainer.max_steps=3 resume=true
    # the final save of step 3 needs a second ~40 GiB folder beside the first: on a small disk it
    # meets a full disk, and the step-2 folder must still be the complete checkpoint resume takes
    { df -h /tmp; ls -la /tmp/fsdp_3b_resume/checkpoints/; python -c "from ring_lightning.training.checkpoint_io import \
      newest_checkpoint as n; print('newest complete checkpoint:', n('/tmp/fsdp_3b_resume/checkpoints')[:2])"; } \
      >> "$R/fsdp_3b_resume_b.log" 2>&1
    kill $SAMPLER; cp /tmp/fsdp_3b_resume/metrics.jsonl "$R/fsdp_3b_resume_metrics.jsonl" 2>/dev/null
    echo "host used MiB (max of 5 s samples): $(sort -n "$R/fsdp_3b_resume_host_used_mb.log" | tail -1)"
    grep -E "resumed|step [0-9]+/|final|Error|error|G .*last" "$R/fsdp_3b_resume_a.log" "$R/fsdp_3b_resume_b.log" | tail -12 ;;
  fsdp_no_room)
    FN="python train.py experiment=base_gpu model=350m model.vocab_size=128256 checkpointing=full strategy=ring_fsdp
      strategy.offload_params=true strategy.save_distributed_checkpoint=true data.seq_len=65536 data.max_tokens=600000
      logger=csv trainer.val_check_interval=2 trainer.limit_val_batches=1 trainer.log_every_n_steps=1
      callbacks.model_checkpoint.every_n_train_steps=2 callbacks.model_checkpoint.save_top_k=0 hydra.run.dir=/tmp/fsdp_no_room"
    AVAIL=$(df --output=avail -B1 /tmp | tail -1); fallocate -l $((AVAIL - 10 * 2**30)) /tmp/disk_filler
    df -h /tmp > "$R/fsdp_no_room_df.txt"
    part fsdp_no_room_a 150 $FN trainer.max_steps=2
    part fsdp_no_room_b 150 $FN trainer.max_steps=3 resume=true
    { df -h /tmp; ls -la /tmp/fsdp_no_room/checkpoints/; python -c "from ring_lightning.training.checkpoint_io import \
      newest_checkpoint as n; print('newest complete checkpoint:', n('/tmp/fsdp_no_room/checkpoints')[:2])"; } \
      >> "$R/fsdp_no_room_df.txt" 2>&1
    rm -f /tmp/disk_filler
    grep -E "resumed|step [0-9]+/|final|Error|error|no space" "$R/fsdp_no_room_b.log" | tail -6; tail -8 "$R/fsdp_no_room_df.txt" ;;
  ddp_3b)
    part ddp_3b_preflight 60 $F3B $DDP3B trainer.max_steps=1 hydra.run.dir=/tmp/ddp_3b_preflight
    grep -E "memory|ConfigError" "$R/ddp_3b_preflight.log" | tail -3
    part ddp_3b 180 $F3B $DDP3B preflight.check_memory=false trainer.max_steps=2 trainer.val_check_interval=2 \
      hydra.run.dir=/tmp/ddp_3b
    grep -E "OutOfMemory|out of memory|step [0-9]+/|final" "$R/ddp_3b.log" | tail -4 ;;
  *) echo "unknown part $p" ;;
esac; done
pack
