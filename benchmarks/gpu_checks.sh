#!/usr/bin/env bash
# One-GPU checks of what users run, in one call (results under $OUT):
#   1. `python train.py` (the README's command, GPU defaults) for 30 steps
#   2. a real SIGTERM at step 15 (as SLURM pre-emption sends), then `resume=true` with a real
#      Ctrl-C (SIGINT to the process group) at step 22, then `resume=true` to step 30:
#      the resumed losses must equal the uninterrupted run's (1)
#   3. the GPU test tier (tests/gpu: one-GPU bf16 parity incl. masks and token grids, train.py
#      defaults and 350m with compiled blocks + selective checkpointing)
# Usage: OUT=results bash benchmarks/gpu_checks.sh   (needs hydra-core/omegaconf/datasets; logger=csv)
set -u
OUT=${OUT:?set OUT to a results folder}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt"
common=(logger=csv trainer.max_steps=30 trainer.val_check_interval=30 trainer.log_every_n_steps=1
        callbacks.model_checkpoint.every_n_train_steps=10)
timeout 240 python train.py "${common[@]}" hydra.run.dir="$OUT/train_default" > "$OUT/train_default.log" 2>&1
echo "rc=$?" >> "$OUT/train_default.log"
rm -rf "$OUT/train_default/checkpoints"
run=/tmp/gpu_checks_sigterm
rm -rf "$run"
PYTHONPATH="$PYTHONPATH:$PWD/tests/integration" timeout 240 python train.py "${common[@]}" hydra.run.dir="$run" \
  +callbacks.sigterm._target_=_interrupt.SigtermAtStep +callbacks.sigterm.step=15 > "$OUT/sigterm.log" 2>&1
echo "rc=$?" >> "$OUT/sigterm.log"
PYTHONPATH="$PYTHONPATH:$PWD/tests/integration" timeout 240 python train.py "${common[@]}" hydra.run.dir="$run" \
  resume=true +callbacks.ctrlc._target_=_interrupt.CtrlCAtStep +callbacks.ctrlc.step=22 > "$OUT/ctrl_c.log" 2>&1
echo "rc=$?" >> "$OUT/ctrl_c.log"
timeout 240 python train.py "${common[@]}" hydra.run.dir="$run" resume=true > "$OUT/resumed.log" 2>&1
echo "rc=$?" >> "$OUT/resumed.log"
python - "$OUT/train_default" "$run" > "$OUT/resume_compare.txt" 2>&1 <<'PY'
import csv, glob, sys
def losses(d):
    out = {}
    for p in sorted(glob.glob(f"{d}/csv/version_*/metrics.csv")):
        for r in csv.DictReader(open(p)):
            if r.get("train/loss"):
                out[int(r["step"])] = float(r["train/loss"])
    return out
a, b = losses(sys.argv[1]), losses(sys.argv[2])
worst = max(abs(a[s] - b[s]) for s in a if s in b)
print(f"steps uninterrupted {len(a)}, interrupted+resumed {len(b)}, same steps {sorted(a) == sorted(b)}, "
      f"max |loss difference| {worst:.3g}")
for s in sorted(a):
    print(s, a[s], b.get(s))
sys.exit(0 if sorted(a) == sorted(b) and worst <= 1e-5 else 1)  # a resumed run repeats the uninterrupted one
PY
echo "rc=$?" >> "$OUT/resume_compare.txt"
timeout "${PYTEST_TIMEOUT:-300}" python -m pytest -q -p no:cacheprovider tests/gpu > "$OUT/pytest_gpu.log" 2>&1
echo "rc=$?" >> "$OUT/pytest_gpu.log"
