"""Runs that survive (train.py, 2 CPU gloo processes): divergence stops or skips with the step
and ranks named and never reaches a checkpoint; last.ckpt holds the final step."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from train_runner import RUN_TIMEOUT_S, final_metrics, run_train

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2 * RUN_TIMEOUT_S + 60)]
SMALL = ["data.seq_len=256", "data.batch_size=2", "data.max_tokens=40000", "trainer.limit_val_batches=1",
         "trainer.log_every_n_steps=1", "module.warmup_steps=1", "logger=csv"]


def checkpoint_weights_are_finite(run_dir: Path) -> list:
    """(file, all weights finite) of every checkpoint on disk."""
    out = []
    for f in sorted((run_dir / "checkpoints").glob("*.ckpt")):
        state = torch.load(f, map_location="cpu", weights_only=False)["state_dict"]
        out.append((f.name, all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())))
    return out


@pytest.mark.parametrize("variant", ["standard", "distributed"])
def test_divergence_stops_naming_the_step_and_keeps_only_finite_checkpoints(tmp_path, data_cache, variant):
    out = run_train([f"hydra.run.dir={tmp_path}", *SMALL, f"variant={variant}", "module.lr=1e6",
                     "trainer.max_steps=12", "trainer.val_check_interval=12",
                     "callbacks.model_checkpoint.every_n_train_steps=1"], data_cache, expect_failure=True)
    # distributed's own gradient validation may name the module first; both stop the run
    expected = "non-finite gradient at step" if variant == "standard" else "non-finite gradient"
    assert expected in out, out[-3000:]
    kept = checkpoint_weights_are_finite(tmp_path)
    assert kept and all(ok for _, ok in kept), kept


def test_skip_policy_drops_bad_steps_then_stops_past_its_limit(tmp_path, data_cache):
    out = run_train([f"hydra.run.dir={tmp_path}", *SMALL, "module.lr=1e6", "trainer.max_steps=30",
                     "trainer.val_check_interval=30", "callbacks.non_finite.policy=skip",
                     "callbacks.non_finite.max_skips=2"], data_cache, expect_failure=True)
    assert "more than max_skips=2 steps were skipped" in out, out[-3000:]
    assert all(ok for _, ok in checkpoint_weights_are_finite(tmp_path))


def test_last_checkpoint_holds_the_final_step(tmp_path, data_cache):
    """Final steps between intervals (3, then 7 with interval 5): last.ckpt follows each end,
    also across a resume, and no last-v1.ckpt appears beside it."""
    common = [f"hydra.run.dir={tmp_path}", *SMALL, "callbacks.model_checkpoint.every_n_train_steps=5"]
    run_train([*common, "trainer.max_steps=3", "trainer.val_check_interval=3"], data_cache)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 3
    out = run_train([*common, "trainer.max_steps=7", "trainer.val_check_interval=7", "resume=true"], data_cache)
    assert final_metrics(out)["step"] == 7
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 7
    assert not list((tmp_path / "checkpoints").glob("last-v*.ckpt"))
    assert f"hydra.run.dir={tmp_path} resume=true trainer.max_steps=14" in out  # the continue command, as printed


def test_resume_without_checkpoint_says_so(tmp_path, data_cache):
    out = run_train([f"hydra.run.dir={tmp_path}", *SMALL, "trainer.max_steps=1", "trainer.val_check_interval=1",
                     "resume=true"], data_cache)
    assert "resume=true: no checkpoint to resume in" in out


def test_damaged_newest_checkpoint_is_reported_and_an_older_one_resumed(tmp_path, data_cache):
    run_train([f"hydra.run.dir={tmp_path}", *SMALL, "trainer.max_steps=4", "trainer.val_check_interval=4",
               "callbacks.model_checkpoint.every_n_train_steps=2"], data_cache)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a write cut off half-way
    out = run_train([f"hydra.run.dir={tmp_path}", *SMALL, "trainer.max_steps=6", "trainer.val_check_interval=6",
                     "callbacks.model_checkpoint.every_n_train_steps=2", "resume=true"], data_cache)
    assert f"{last} is damaged" in out
    assert f"resumed from {tmp_path / 'checkpoints' / 'step000004.ckpt'}" in out
    assert final_metrics(out)["step"] == 6
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))  # atomic writes leave no temporaries


def test_a_config_that_differs_on_one_rank_fails_at_start_up_naming_the_key(tmp_path, data_cache):
    """Rank 1 (started by Lightning, LOCAL_RANK=1 in its environment) composes another run_name."""
    out = run_train([f"hydra.run.dir={tmp_path}", *SMALL, "trainer.max_steps=2", "trainer.val_check_interval=2",
                     "run_name=${oc.env:LOCAL_RANK,main}"], data_cache, expect_failure=True)
    assert "were started with different configs: run_name differ" in out, out[-3000:]
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").glob("*.ckpt"))


INTERRUPT_ENV = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.parametrize("strategy", [pytest.param([], id="ddp"),
                                      pytest.param(["strategy=ring_fsdp", "strategy.save_distributed_checkpoint=true"],
                                                   id="fsdp_sharded")])
def test_a_killed_rank_ends_the_job_naming_it_and_the_run_resumes(tmp_path, data_cache, strategy):
    """Rank 1 is SIGKILLed after step 3: rank 0 names it and how it ended, the job ends well
    within the timeout, and resume=true continues from the step-2 checkpoint to the end (under
    ring_fsdp: a folder of shards)."""
    common = [f"hydra.run.dir={tmp_path}", *SMALL, "trainer.max_steps=6", "trainer.val_check_interval=6",
              "callbacks.model_checkpoint.every_n_train_steps=2", *strategy]
    start = time.monotonic()
    out = run_train([*common, "+callbacks.kill._target_=_interrupt.KillRankAtStep", "+callbacks.kill.step=3"],
                    data_cache, expect_failure=True, env=INTERRUPT_ENV)
    assert "rank 0: lost rank 1 (pid" in out and "killed by SIGKILL" in out, out[-3000:]
    assert time.monotonic() - start < RUN_TIMEOUT_S
    out = run_train([*common, "resume=true"], data_cache)
    assert f"resumed from {tmp_path / 'checkpoints' / 'last.ckpt'}" in out
    assert (tmp_path / "checkpoints" / "last.ckpt").is_dir() == bool(strategy)
    assert final_metrics(out)["step"] == 6


def test_a_frozen_rank_times_out_and_is_not_left_running(tmp_path, data_cache):
    """Rank 1 stops answering after step 2: rank 0 reports a timeout within the configured
    limits and ends rank 1 on the way out: no orphan keeps running. (The process-group timeout
    must outlast the ranks' start-up; Lightning's per-step broadcast swallows its own timeout,
    so the ring's 5 s is what reports.)"""
    out = run_train([f"hydra.run.dir={tmp_path}", *SMALL, "trainer.max_steps=6", "trainer.val_check_interval=6",
                     "+variant.comm_timeout_s=5", "+strategy.timeout._target_=datetime.timedelta",
                     "+strategy.timeout.seconds=30", "+callbacks.freeze._target_=_interrupt.FreezeRankAtStep",
                     "+callbacks.freeze.step=2"], data_cache, expect_failure=True, env=INTERRUPT_ENV)
    assert "stopped answering: a collective timed out" in out and "Training stopped at step 2" in out, out[-3000:]
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={tmp_path}"], capture_output=True, text=True).stdout
    assert not left.strip(), f"processes of the run still running: {left}"
