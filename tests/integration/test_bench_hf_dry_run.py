"""benchmarks/bench_hf.py stays runnable: its CPU dry run (a tiny HF Llama) writes its JSON and table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_hf_benchmark_dry_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "benchmarks/bench_hf.py", "--dry-run", "--documents", "2",
                           "--json", str(tmp_path / "bench_hf.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "bench_hf.json").read_text())["rows"]
    assert [r["attention"] for r in rows] == ["ring_lightning", "sdpa", "ring_lightning+2docs"]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    # the same weights and tokens: the first losses agree (float32 on CPU)
    assert abs(rows[0]["first_loss"] - rows[1]["first_loss"]) < 1e-5
    assert "| sdpa | 256 |" in proc.stdout and "python train.py experiment=base_gpu model=hf" in proc.stdout
