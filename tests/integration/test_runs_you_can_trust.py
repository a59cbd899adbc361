"""Runs a user can trust (train.py, 2 CPU gloo processes): a data=files run with a list of paths
stopped by SIGTERM and then by a real Ctrl-C (SIGINT to the process group) resumes step for step;
a second run in a live run directory and a resume under a changed model are refused before
launch; a full checkpoint directory is one message and leaves the earlier checkpoints."""

import json
import os
from pathlib import Path

import pytest
import torch
from test_resume_exact import COMMON, assert_same_losses, logged_losses
from train_runner import ROOT, RUN_TIMEOUT_S, run_train

pytestmark = [pytest.mark.integration, pytest.mark.timeout(6 * RUN_TIMEOUT_S)]
ENV = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")])}
# The list form of the README, three files of this repository (~75 windows of 257 bytes)
FILES = ["data=files", "data.paths=[" + ",".join(str(ROOT / "ring_lightning" / f) for f in
                                                 ("models/model.py", "training/module.py", "parallel/strategy.py")) + "]",
         "data.max_tokens=20000", "trainer.val_check_interval=8", "callbacks.model_checkpoint.every_n_train_steps=2"]
NOT_STARTED = ("Traceback", "Initializing distributed", "GLOBAL_RANK")


def test_a_files_run_stopped_by_sigterm_then_ctrl_c_resumes_step_for_step(tmp_path, data_cache):
    reference = tmp_path / "reference"
    run_train([f"hydra.run.dir={reference}", *COMMON, *FILES, "trainer.max_steps=8"], data_cache)
    run = tmp_path / "interrupted"
    common = [f"hydra.run.dir={run}", *COMMON, *FILES, "trainer.max_steps=8"]
    out = run_train([*common, "+callbacks.stop._target_=_interrupt.SigtermAtStep", "+callbacks.stop.step=3"],
                    data_cache, expect_failure=True, env=ENV)
    assert "interrupted by SIGTERM at step 3" in out and "last.ckpt holds it" in out, out[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3  # the data module's list: plain
    out = run_train([*common, "resume=true", "+callbacks.stop._target_=_interrupt.CtrlCAtStep",
                     "+callbacks.stop.step=6"], data_cache, expect_failure=True, env=ENV)
    assert f"resumed from {last}" not in out  # (the summary of a finished run; this one was interrupted)
    assert "interrupted by SIGINT (Ctrl-C) at step 6" in out and "last.ckpt holds it" in out, out[-3000:]
    assert "Detected KeyboardInterrupt" not in out and "Traceback" not in out, out[-3000:]
    assert torch.load(last, weights_only=True)["global_step"] == 6
    out = run_train([*common, "resume=true"], data_cache, env=ENV)
    assert f"resumed from {last}" in out, out[-3000:]
    assert_same_losses(logged_losses(run), logged_losses(reference), 8)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, 9)), steps  # steps 1-8, none twice across the resumes
    assert not (run / ".ring_lightning" / "run.lock").exists()  # released by every run

    # Resume under another head split (same tensor shapes): refused before launch, naming the keys.
    out = run_train([*common, "resume=true", "model.n_heads=8", "model.n_kv_heads=4"], data_cache,
                    expect_failure=True, env={"HYDRA_FULL_ERROR": "0"})
    assert out.count("model.n_heads 4 -> 8") == 1 and "model.n_kv_heads 2 -> 4" in out, out[-3000:]
    assert "resume_weights_only=true" in out and not [s for s in NOT_STARTED if s in out], out[-3000:]


def test_a_second_run_in_a_live_run_directory_is_refused_before_launch(tmp_path, data_cache):
    lock = tmp_path / ".ring_lightning" / "run.lock"
    lock.parent.mkdir(parents=True)
    from ring_lightning.app.run_dir import identity

    lock.write_text(json.dumps(identity("python train.py (the first run)")))  # this test process: alive
    out = run_train([f"hydra.run.dir={tmp_path}", *COMMON, "trainer.max_steps=2"], data_cache, expect_failure=True,
                    env={"HYDRA_FULL_ERROR": "0"})
    assert f"hydra.run.dir={tmp_path} belongs to a run that is still running (pid {os.getpid()}" in out, out[-3000:]
    assert "python train.py (the first run)" in out and not [s for s in NOT_STARTED if s in out]
    assert not (tmp_path / "checkpoints").exists() and json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_full_checkpoint_directory_is_one_message_and_keeps_the_earlier_checkpoints(tmp_path, data_cache):
    out = run_train([f"hydra.run.dir={tmp_path}", *COMMON, *FILES, "trainer.max_steps=6",
                     "+callbacks.full._target_=_interrupt.DiskFullAtStep", "+callbacks.full.step=4"], data_cache,
                    expect_failure=True, env={**ENV, "HYDRA_FULL_ERROR": "0"})
    message = f"no space left to write checkpoint {tmp_path / 'checkpoints' / 'step000004.ckpt'}: it needs"
    assert out.count(message) == 1 and "are free in" in out, out[-4000:]
    assert "Traceback" not in out and "lost" not in out, out[-4000:]
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["last.ckpt", "step000002.ckpt"], kept  # no partial file
    assert all(torch.load(tmp_path / "checkpoints" / n, weights_only=True)["global_step"] == 2 for n in kept)
