"""The GPU scripts stay runnable: their CPU/gloo dry runs (2 processes) in CI.

``benchmarks/run_all.sh`` runs ``tests/gpu/gpu_parity.py`` and ``benchmarks/bench_attention.py``;
``benchmarks/bench_variants.py`` runs alone. The real runs need GPUs (benchmarks/README.md);
this catches a script that went stale against the engine's API before it costs device time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


def _run(cmd, tmp_path, timeout=300):
    env = dict(os.environ, OUT=str(tmp_path), DRY_RUN="1", OMP_NUM_THREADS="1", PYTHON=sys.executable,
               PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.stdout


def test_parity_and_benchmark_scripts_dry_run(tmp_path):
    out = _run(["bash", "benchmarks/run_all.sh"], tmp_path)
    assert "PARITY PASSED" in out
    assert (tmp_path / "bench_attention.json").exists()


def test_variants_benchmark_dry_run(tmp_path):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "benchmarks/bench_variants.py", "--dry-run"], tmp_path)
    assert "block_sparse" in out and (tmp_path / "bench_variants.json").exists()
