"""Run train.py as a user does (a subprocess from the repository root) and read its summary.

Shared by the integration tier (CPU, 2 gloo processes) and the GPU tier.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 240  # one 2-process run of a few steps takes ~10-30 s on 2 busy cores


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """One window cache for the session: the first run packs the corpus, the rest reuse it."""
    return str(tmp_path_factory.mktemp("data_cache"))


def run_train(args, data_cache, timeout=RUN_TIMEOUT_S, expect_failure=False, env=None) -> str:
    """Run `python train.py *args` from the repo root; return its output, fail with it
    (``expect_failure``: the run must exit non-zero instead; ``env``: variables to change)."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "1",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [sys.executable, "train.py", *args, f"data.cache_dir={data_cache}"]
    # Own process group: on a timeout the ranks Lightning started die with rank 0.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s:\n{out[-4000:]}")
    if expect_failure:
        assert proc.returncode != 0, f"{' '.join(cmd)} succeeded but should fail:\n{out[-6000:]}"
        return out
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def final_metrics(out: str) -> dict:
    """The `name value` pairs of the summary's `final` line (step, train/loss, val/loss, ...)."""
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("final "))
    words = line.split()[1:]
    return {k: float(v) for k, v in zip(words[::2], words[1::2])}
