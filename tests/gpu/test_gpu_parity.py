"""GPU tier: run tests/gpu/gpu_parity.py on 2 GPUs (NCCL, bf16) and require every case to pass.

Skipped without CUDA or with fewer than 2 GPUs. The script itself compares every variant
with the float64 brute-force reference (docs/ARCHITECTURE.md); this test launches it the
way a user would (torchrun, 2 processes) with a hard timeout so a hang cannot outlive it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "gpu" / "gpu_parity.py"
TIMEOUT_S = 600

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]


@pytest.mark.timeout(TIMEOUT_S + 60)
def test_gpu_parity_two_gpus(tmp_path):
    env = dict(os.environ)
    env.update(OUT=str(tmp_path), PYTHONUNBUFFERED="1", NCCL_NVLS_ENABLE="0",
               TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
               TORCH_NCCL_ASYNC_ERROR_HANDLING="1",
               PYTHONPATH=str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"gpu_parity.py did not finish within {TIMEOUT_S}s:\n{(exc.stdout or '')[-4000:]}")
    tail = (proc.stdout + proc.stderr)[-6000:]
    result_file = tmp_path / "gpu_parity.json"
    assert result_file.exists(), f"no results written (exit {proc.returncode}):\n{tail}"
    data = json.loads(result_file.read_text())
    assert data.get("complete"), f"the run stopped early:\n{tail}"
    bad = [r for r in data["results"] if r["status"] != "PASS"]
    assert not bad, "cases not passing:\n" + "\n".join(
        f"{r['variant']} {r['pattern']} causal={r['causal']} layout={r['layout']} split={r['split']} "
        f"{r['dtype']}: {r['status']} errors={r['errors']} {r.get('error') or ''}" for r in bad[:20])
    assert proc.returncode == 0, f"gpu_parity.py exited {proc.returncode}:\n{tail}"
    assert data["results"], "no cases ran"
