"""benchmarks/bench_model.py stays runnable: its CPU dry run (tiny model) writes its JSON and table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_model_benchmark_dry_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "benchmarks/bench_model.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_model.json").read_text())["rows"]
    kinds = {r["kind"] for r in rows}
    assert {"train", "longest", "attention", "optimizer"} <= kinds
    assert all(r["tokens_per_s"] > 0 for r in rows if r["kind"] == "train")
    assert "| tiny | 256 | selective |" in proc.stdout


def test_recipe_mfu_dry_run_puts_the_logged_run_next_to_the_bare_step(tmp_path):
    """benchmarks/recipe_mfu.py (the GPU check of the logged MFU) stays runnable: CPU, tiny model."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, "benchmarks/recipe_mfu.py", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "recipe_mfu.json").read_text())
    assert result["logged"]["step"] == 4 and result["logged"]["perf/tokens_per_s"] > 0
    assert result["bench"]["status"] == "ok" and result["bench"]["tokens_per_s"] > 0
    assert "| train.py, logged at step 4 |" in proc.stdout and "| bench_model.py step, same module and batch |" in proc.stdout
