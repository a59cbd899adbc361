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
