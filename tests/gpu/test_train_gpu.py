"""GPU tier: `python train.py` as the README writes it, on one GPU, completes finite steps.

Skipped without CUDA. bf16-mixed with gradient clipping (the GPU defaults) must train:
this is the run that failed before (a fused AdamW that Lightning refuses to clip, and a
sequence-parallel size of 2 on one device).
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from train_runner import final_metrics, run_train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
SHORT = ["trainer.max_steps=10", "trainer.val_check_interval=10", "trainer.limit_val_batches=2",
         "callbacks.model_checkpoint.every_n_train_steps=5", "logger=csv", "data.max_tokens=200000"]


@pytest.mark.timeout(600)
def test_train_py_defaults_complete_on_one_gpu(tmp_path, data_cache):
    out = run_train(["trainer.devices=1", f"hydra.run.dir={tmp_path}", *SHORT], data_cache, timeout=540)
    metrics = final_metrics(out)
    assert metrics["step"] == 10 and math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    mfu = [float(r["perf/mfu"]) for r in rows if r.get("perf/mfu")]
    assert mfu and all(0 < m < 1 for m in mfu), "MFU is logged on CUDA and lies in (0, 1)"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.timeout(600)
def test_train_py_350m_with_compiled_blocks_and_selective_checkpointing(tmp_path, data_cache):
    out = run_train(["experiment=base_gpu", "model=350m", "checkpointing=selective", "module.compile=true",
                     "data.seq_len=16384", f"hydra.run.dir={tmp_path}", *SHORT, "data.max_tokens=2000000"], data_cache, timeout=540)
    metrics = final_metrics(out)
    assert metrics["step"] == 10 and math.isfinite(metrics["train/loss"])
