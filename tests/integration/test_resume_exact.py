"""Exact resume (train.py, gloo CPU processes): a run stopped by a real SIGTERM after a
checkpoint and resumed with `resume=true` logs the same losses, step for step, as the run
that was never interrupted: within an epoch, across an epoch boundary, and under dp x sp."""

import csv
import os
from pathlib import Path

import pytest
from train_runner import RUN_TIMEOUT_S, run_train

pytestmark = [pytest.mark.integration, pytest.mark.timeout(4 * RUN_TIMEOUT_S + 60)]
HERE = str(Path(__file__).resolve().parent)  # _interrupt.py, importable by the runs
COMMON = ["data.seq_len=256", "data.batch_size=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
          "module.warmup_steps=2", "logger=csv", "callbacks.progress_bar=null"]


def logged_losses(run_dir: Path) -> dict:
    """step -> train/loss over every csv logger version of the run (a resume writes a new one)."""
    losses = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def interrupted_and_resumed(tmp_path, data_cache, args, stop_at, max_steps, **kw) -> dict:
    run_dir = tmp_path / "interrupted"
    env = {"PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    common = [f"hydra.run.dir={run_dir}", *COMMON, *args, f"trainer.max_steps={max_steps}"]
    out = run_train([*common, "+callbacks.sigterm._target_=_interrupt.SigtermAtStep",
                     f"+callbacks.sigterm.step={stop_at}"], data_cache, expect_failure=True, env=env, **kw)
    assert f"interrupted by SIGTERM at step {stop_at}" in out, out[-4000:]
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and "last.ckpt holds it" in out
    out = run_train([*common, "resume=true"], data_cache, **kw)
    assert f"resumed from {run_dir / 'checkpoints' / 'last.ckpt'}" in out, out[-3000:]
    assert "not resumable" not in out  # Lightning's warning for loaders that restart their epoch
    return logged_losses(run_dir)


def uninterrupted(tmp_path, data_cache, args, max_steps, **kw) -> dict:
    run_dir = tmp_path / "uninterrupted"
    run_train([f"hydra.run.dir={run_dir}", *COMMON, *args, f"trainer.max_steps={max_steps}"], data_cache, **kw)
    return logged_losses(run_dir)


def assert_same_losses(resumed: dict, reference: dict, max_steps: int) -> None:
    assert sorted(reference) == sorted(resumed) and len(reference) >= max_steps - 1, (reference, resumed)
    for step in reference:
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-6), (step, resumed, reference)


@pytest.mark.parametrize("case", ["mid_epoch", "epoch_boundary"])
def test_sigterm_then_resume_repeats_the_uninterrupted_losses(tmp_path, data_cache, case):
    if case == "mid_epoch":  # ~70 batches per epoch: stop at 4 of 8
        args, stop_at, max_steps = ["data.max_tokens=40000", "trainer.val_check_interval=8"], 4, 8
    else:  # 3 batches per epoch: stop at the end of epoch 2 (step 6), train on into epoch 4
        args = ["data.max_tokens=2200", "trainer.val_check_interval=null", "trainer.check_val_every_n_epoch=2"]
        stop_at, max_steps = 6, 10
    reference = uninterrupted(tmp_path, data_cache, args, max_steps)
    resumed = interrupted_and_resumed(tmp_path, data_cache, args, stop_at, max_steps)
    assert_same_losses(resumed, reference, max_steps)


def test_sigterm_then_resume_is_exact_under_dp2_sp2_with_topk_compression(tmp_path, data_cache):
    """4 processes (dp=2 x sp=2): every dp rank's data position, every rank's error feedback."""
    args = ["data.max_tokens=40000", "trainer.val_check_interval=6", "trainer.devices=4",
            "strategy.sequence_parallel_size=2", "compression=topk"]
    timeout = 2 * RUN_TIMEOUT_S
    reference = uninterrupted(tmp_path, data_cache, args, 6, timeout=timeout)
    resumed = interrupted_and_resumed(tmp_path, data_cache, args, 3, 6, timeout=timeout)
    assert_same_losses(resumed, reference, 6)
