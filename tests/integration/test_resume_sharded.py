"""Sharded checkpoints (strategy=ring_fsdp strategy.save_distributed_checkpoint=true: a folder of
shards) through train.py on gloo CPU processes: a run stopped by a real SIGTERM resumes with
`resume=true` step for step as the uninterrupted run; a checkpoint of 4 ranks resumes on 2
(torch.distributed.checkpoint reshards the weights and AdamW's moments, bit for bit) with the
data position as ring_lightning/data/resumable.py defines it: kept when the number of
data-parallel ranks is the same (sp 4 -> 2 at dp 1), the epoch restarted otherwise. The folder's
consolidated export (ring_lightning/app/export.py) loads into LongDocumentLM."""

import os

import pytest
import torch
from test_resume_exact import COMMON, HERE, assert_same_losses, interrupted_and_resumed, logged_losses, uninterrupted
from train_runner import RUN_TIMEOUT_S, run_train

from ring_lightning.app.export import consolidated_state_dict
from ring_lightning.parallel.sharded_checkpoint import read_full_state
from ring_lightning.training.checkpoint_io import checkpoint_metadata
from ring_lightning.training.module import LongDocumentLM

pytestmark = [pytest.mark.integration, pytest.mark.timeout(6 * RUN_TIMEOUT_S + 60)]
SHARDED = ["strategy=ring_fsdp", "strategy.save_distributed_checkpoint=true"]
MID_EPOCH = ["data.max_tokens=40000", "trainer.val_check_interval=8"]  # ~70 batches per epoch
RESHARD_TOL = 1e-5  # sp=4 and sp=2 add the same attention blocks in other orders (float32)


def test_sharded_checkpoint_resumes_step_for_step_after_sigterm(tmp_path, data_cache):
    args = [*SHARDED, *MID_EPOCH]
    reference = uninterrupted(tmp_path, data_cache, args, 8)
    resumed = interrupted_and_resumed(tmp_path, data_cache, args, 4, 8)
    ckpt_dir = tmp_path / "interrupted" / "checkpoints"
    assert (ckpt_dir / "last.ckpt").is_dir() and (ckpt_dir / "last.ckpt" / ".metadata").is_file()
    assert sorted(os.listdir(ckpt_dir)) == ["last.ckpt"]  # replaced in place: no staging or old folder left
    assert_same_losses(resumed, reference, 8)
    # The consolidated export of the folder is what LongDocumentLM's load_state_dict reads.
    folder = str(ckpt_dir / "last.ckpt")
    module = LongDocumentLM(**checkpoint_metadata(folder)["hyper_parameters"])
    module.load_state_dict(consolidated_state_dict(folder), strict=True)
    assert torch.equal(module.state_dict()["model.tok_embeddings.weight"],
                       read_full_state(folder)["state_dict"]["model.tok_embeddings.weight"])


def _assert_equal_state(loaded: dict, saved: dict) -> None:
    assert set(loaded["state_dict"]) == set(saved["state_dict"])
    for name, tensor in saved["state_dict"].items():
        assert torch.equal(loaded["state_dict"][name], tensor), f"weights of {name}"
    got, want = loaded["optimizer_0"], saved["optimizer_0"]
    assert set(got["state"]) == set(want["state"]) == set(saved["state_dict"])
    for name, moments in want["state"].items():
        for key, value in moments.items():
            assert torch.equal(torch.as_tensor(got["state"][name][key]), torch.as_tensor(value)), f"AdamW {key} of {name}"
    assert [g["lr"] for g in got["param_groups"]] == [g["lr"] for g in want["param_groups"]]


@pytest.mark.parametrize("saved_at", [pytest.param("sp4", id="sp4-to-sp2"), pytest.param("dp2_sp2", id="dp2sp2-to-sp2")])
def test_sharded_checkpoint_of_4_ranks_resumes_on_2(tmp_path, data_cache, saved_at):
    sp4 = saved_at == "sp4"
    at_4 = [*SHARDED, *MID_EPOCH, "trainer.devices=4", f"strategy.sequence_parallel_size={4 if sp4 else 2}"]
    at_2 = [*SHARDED, *MID_EPOCH, "trainer.devices=2", "strategy.sequence_parallel_size=2"]
    stop_at, max_steps, timeout = 3, 6, 2 * RUN_TIMEOUT_S
    run_dir = tmp_path / "interrupted"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    env = {"PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    common = [f"hydra.run.dir={run_dir}", *COMMON, f"trainer.max_steps={max_steps}"]
    out = run_train([*common, *at_4, "+callbacks.sigterm._target_=_interrupt.SigtermAtStep",
                     f"+callbacks.sigterm.step={stop_at}"], data_cache, expect_failure=True, env=env, timeout=timeout)
    assert f"interrupted by SIGTERM at step {stop_at}" in out and f"{ckpt} holds it" in out, out[-4000:]
    saved = read_full_state(str(ckpt))  # what the 4 ranks wrote, reassembled in this process
    dump = tmp_path / "start_state.pt"
    out = run_train([*common, *at_2, "resume=true", "+callbacks.dump._target_=_sharded_state.DumpStartState",
                     f"+callbacks.dump.path={dump}"], data_cache, env=env, timeout=timeout)
    assert f"resumed from {ckpt}" in out, out[-3000:]
    loaded = torch.load(dump, weights_only=False)
    assert loaded["global_step"] == stop_at
    _assert_equal_state(loaded, saved)
    resumed = logged_losses(run_dir)
    assert max(resumed) == max_steps, resumed
    if sp4:  # the same dp: the data position carries over, the 2 ranks go on as the 4 would have
        assert "restarts at its first batch" not in out
        reference = uninterrupted(tmp_path, data_cache, at_4, max_steps, timeout=timeout)
        for step in reference:
            assert resumed[step] == pytest.approx(reference[step], rel=RESHARD_TOL, abs=RESHARD_TOL), (step, resumed, reference)
    else:  # dp 2 -> 1: another number of batches per epoch, the epoch restarts (resumable.py)
        assert "restarts at its first batch" in out, out[-3000:]
