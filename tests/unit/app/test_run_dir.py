"""One run per run directory (ring_lightning/app/run_dir.py) and the resume config check
(ring_lightning/app/resume_compat.py): a live owner refuses a second run naming itself, a stale lock
is taken over, a fresh run never writes beside another run's checkpoints, metrics.jsonl keeps the
rows up to the resumed step; every config difference classed, refused keys named per class."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from ring_lightning.app import run_dir
from ring_lightning.training.checkpoint_io import AtomicCheckpointIO
from ring_lightning.parallel.compression_checkpoint import restore_compression_state
from ring_lightning.preflight import ConfigError
from ring_lightning.app.resume_compat import CONFIG_KEY, check_resume, classify


@pytest.fixture(autouse=True)
def no_lock_left():
    yield
    run_dir.release_owned_lock()


def write_lock(path, **owner):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "started": "2026-01-01 00:00:00", "command": "train.py x=1",
                   **owner}, f)


def test_a_live_owner_refuses_a_second_run_naming_dir_and_owner(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(run_dir.lock_path(str(tmp_path)), pid=other.pid, proc_start=run_dir._proc_start(other.pid))
        with pytest.raises(ConfigError) as err:
            run_dir.acquire(str(tmp_path))
        assert f"hydra.run.dir={tmp_path} belongs to a run that is still running (pid {other.pid}" in str(err.value)
        assert "train.py x=1" in str(err.value)
    finally:
        other.kill()
        other.wait()
    notes = run_dir.acquire(str(tmp_path))  # its process is gone now: a stale lock, taken over
    assert len(notes) == 1 and "was left by a run that is gone" in notes[0]
    with open(run_dir.lock_path(str(tmp_path))) as f:
        assert json.load(f)["pid"] == os.getpid()
    run_dir.release_owned_lock()
    assert not os.path.exists(run_dir.lock_path(str(tmp_path)))


def test_a_reused_pid_is_not_the_owner(tmp_path):
    write_lock(run_dir.lock_path(str(tmp_path)), pid=1, proc_start="no such start")  # pid 1 lives, another process
    assert run_dir.acquire(str(tmp_path))


def cfg_for(tmp_path, **over):
    cfg = {"paths": {"output_dir": str(tmp_path)}, "ckpt_path": None, "resume": False, "resume_weights_only": False,
           "callbacks": {"model_checkpoint": {"dirpath": str(tmp_path / "checkpoints")}}}
    cfg.update(over)
    return OmegaConf.create(cfg)


FLAT = {"seed": 0, "model.dim": 64, "model.n_heads": 4, "module.lr": 1e-3, "trainer.max_steps": 10}


def save(path, step, flat=FLAT):
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "state_dict": {}, CONFIG_KEY: flat}, path)


def test_a_fresh_run_is_refused_over_another_runs_checkpoints_and_resume_takes_the_newest_step(tmp_path):
    os.makedirs(tmp_path / "checkpoints")
    save(tmp_path / "checkpoints" / "step000012.ckpt", 12)
    save(tmp_path / "checkpoints" / "last.ckpt", 10)
    with pytest.raises(ConfigError, match="already holds the checkpoints of another run, up to step 12"):
        run_dir.start_run(cfg_for(tmp_path), FLAT, launching=True)
    start = run_dir.start_run(cfg_for(tmp_path, resume=True), FLAT, launching=True)
    assert (start.ckpt_path, start.step) == (str(tmp_path / "checkpoints" / "step000012.ckpt"), 12)
    assert os.environ[run_dir.ENV_RESUME] == f"{start.ckpt_path}|"  # what the ranks Lightning starts take


def test_metrics_keep_the_rows_up_to_the_resumed_step(tmp_path):
    rows = [{"step": s, "train/loss": 1.0} for s in range(8)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "2 row(s) logged after step 5 dropped" in run_dir.trim_metrics(str(tmp_path), 5)
    # a row's step counts the optimizer steps done: the rows of steps 1-5 are the checkpoint's
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3, 4, 5]
    assert "moved to" in run_dir.trim_metrics(str(tmp_path), None)  # a fresh run: the old file set aside
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("key, old, new", [
    ("model.n_heads", 4, 8),                  # same tensor shapes, another head split
    ("model.vocab_size", 259, 300),           # a shape
    ("variant.variant", "standard", "block_sparse"),
    ("variant.sparse_pattern", "local_window", "dilated"),
    ("seed", 0, 1),
    ("strategy.compression", "topk", "powersgd"),
    ("data.tokenizer", "byte", "gpt2"),
])
def test_shape_or_meaning_changing_keys_are_refused_by_name(key, old, new):
    refused, notes = classify({key: old, "module.lr": 1e-3}, {key: new, "module.lr": 1e-3})
    assert len(refused) == 1 and refused[0].startswith(f"{key} {old!r} -> {new!r} (") and not notes


@pytest.mark.parametrize("key, old, new, effect", [
    ("trainer.max_steps", 10, 20, "the run now ends there"),
    ("module.lr", 1e-3, 5e-4, "the optimizer and the loss continue"),
    ("data.batch_size", 4, 8, "the data position restarts its epoch if they no longer match"),
    ("data.paths", ["a"], ["a", "b"], "data position"),
    ("logger.wandb.project", "a", "b", "logging only"),
    ("model.checkpointing", "none", "full", "taken as given"),  # activation checkpointing: same weights
    ("model.offload_activations", False, True, "taken as given"),  # the memory options: same numbers
    ("model.blocks_per_checkpoint", 1, 2, "taken as given"),
    ("model.mlp_tile_tokens", 0, 16384, "taken as given"),
])
def test_keys_that_may_change_are_accepted_with_one_line_each(key, old, new, effect):
    refused, notes = classify({key: old}, {key: new})
    assert not refused and len(notes) == 1 and key in notes[0] and effect in notes[0]


def test_the_module_copy_of_a_group_is_named_once_and_run_paths_are_ignored():
    saved = {"model.dim": 64, "module.model.dim": 64, "ckpt_path": None, "trainer.default_root_dir": "/a"}
    now = {"model.dim": 128, "module.model.dim": 128, "ckpt_path": "/a/last.ckpt", "trainer.default_root_dir": "/b"}
    refused, notes = classify(saved, now)
    assert [r.split(" (")[0] for r in refused] == ["model.dim 64 -> 128"] and not notes


def test_check_resume_refuses_with_the_way_out_and_weights_only_accepts(tmp_path):
    path = str(tmp_path / "last.ckpt")
    save(path, 3)
    with pytest.raises(ConfigError) as err:
        check_resume(path, {**FLAT, "model.n_heads": 8}, weights_only=False)
    assert "model.n_heads 4 -> 8" in str(err.value) and f"ckpt_path={path} resume_weights_only=true" in str(err.value)
    notes = check_resume(path, {**FLAT, "model.n_heads": 8, "module.lr": 1e-4}, weights_only=True)
    assert len(notes) == 1 and "taking only the weights" in notes[0] and "model.n_heads 4 -> 8" in notes[0]
    assert any("module.lr" in n for n in check_resume(path, {**FLAT, "module.lr": 1e-4}, weights_only=False))


def test_compression_state_of_another_method_is_dropped_with_a_note(monkeypatch):
    class PowerSGDLike:
        loaded = None

        def state_dict(self):
            return {"steps": 0, "iter": 0}

        def load_state_dict(self, state):
            self.loaded = state

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 1)
    hook = PowerSGDLike()
    with pytest.warns(UserWarning, match="saved under another compression"):
        restore_compression_state(hook, (1, {"steps": 3, "residuals": {}}))  # saved by topk
    assert hook.loaded is None
    restore_compression_state(hook, (1, {"steps": 3, "iter": 5}))
    assert hook.loaded == {"steps": 3, "iter": 5}


def test_a_second_ctrl_c_stops_at_once_and_frees_the_run_directory(tmp_path, monkeypatch):
    """The first Ctrl-C is only noted (the ranks stop together after the step, with a checkpoint);
    the second ends the process now, without one, and the run directory's lock goes with it."""
    import signal

    from ring_lightning.training.callbacks import FinalCheckpoint

    run_dir.acquire(str(tmp_path))
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    callback = FinalCheckpoint()
    callback._note_signal(signal.SIGINT, None)
    callback._note_signal(signal.SIGINT, None)  # the same Ctrl-C forwarded again (`timeout` does): no effect
    assert callback._signal == signal.SIGINT and not exits
    assert os.path.exists(run_dir.lock_path(str(tmp_path)))
    callback._first_sigint -= 1.0  # a second press, a moment later
    callback._note_signal(signal.SIGINT, None)
    assert exits == [130] and not os.path.exists(run_dir.lock_path(str(tmp_path)))


def test_weights_only_loads_matching_shapes_and_names_the_ones_that_do_not(tmp_path):
    from ring_lightning.app.resume_compat import load_weights

    path = str(tmp_path / "w.ckpt")
    AtomicCheckpointIO().save_checkpoint({"global_step": 5, "state_dict": torch.nn.Linear(4, 4).state_dict()}, path)
    same = torch.nn.Linear(4, 4)
    load_weights(same, path)
    assert torch.equal(same.weight, torch.load(path, weights_only=True)["state_dict"]["weight"])
    with pytest.raises(ConfigError, match=r"do not fit this model: size mismatch for weight"):
        load_weights(torch.nn.Linear(4, 8), path)


def test_resume_with_no_loadable_checkpoint_is_refused_not_restarted_from_zero(tmp_path):
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="no checkpoint in .* loads .*last.ckpt"):
        run_dir.start_run(cfg_for(tmp_path, resume=True), FLAT, launching=True)


def test_resume_and_weights_only_together_name_the_way_to_start_from_weights(tmp_path):
    with pytest.raises(ConfigError, match="ckpt_path=<file> resume_weights_only=true"):
        run_dir.start_run(cfg_for(tmp_path, resume=True, resume_weights_only=True), FLAT, launching=True)


def test_a_rollback_sets_the_later_checkpoints_aside_so_resume_never_jumps_forward(tmp_path):
    ckpts = tmp_path / "checkpoints"
    os.makedirs(ckpts)
    for step in (5, 10, 15):
        save(ckpts / f"step{step:06d}.ckpt", step)
    start = run_dir.start_run(cfg_for(tmp_path, ckpt_path=str(ckpts / "step000005.ckpt")), FLAT, launching=True)
    assert start.step == 5 and any("2 checkpoint(s) of later steps moved to" in n for n in start.notes)
    assert sorted(os.listdir(ckpts))[-1] == "step000005.ckpt"  # resume=true now finds step 5 as the newest


def test_a_row_cut_short_by_a_kill_does_not_stop_the_resume(tmp_path):
    rows = "".join(json.dumps({"step": s}) + "\n" for s in range(4)) + '{"step": 4, "train/lo'
    (tmp_path / "metrics.jsonl").write_text(rows)
    assert "1 row(s) logged after step 3 dropped" in run_dir.trim_metrics(str(tmp_path), 3)


def test_ctrl_c_waits_for_the_end_of_a_gradient_accumulation(capfd):
    """A Ctrl-C noted mid-accumulation stops nothing until the micro-batch of the optimizer step:
    the checkpoint's data position never runs past gradients no step used. The first press says so."""
    import signal
    from types import SimpleNamespace

    from ring_lightning.training.callbacks import FinalCheckpoint

    callback = FinalCheckpoint()
    callback._note_signal(signal.SIGINT, None)
    assert "Ctrl-C: finishing this step and writing last.ckpt" in capfd.readouterr().err
    accumulating = [True]
    trainer = SimpleNamespace(world_size=1, _signal_connector=SimpleNamespace(received_sigterm=False),
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                                  _should_accumulate=lambda: accumulating[0])))
    module = SimpleNamespace(device=torch.device("cpu"))
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert not trainer._signal_connector.received_sigterm
    accumulating[0] = False
    callback.on_train_batch_end(trainer, module, None, None, 1)
    assert trainer._signal_connector.received_sigterm and callback.stopped_by == "SIGINT"


def test_a_rank_choosing_for_itself_waits_for_rank_0_to_clear_the_leftovers(tmp_path, monkeypatch):
    """torchrun / SLURM: every rank chooses what to resume, rank 0 (the launching process) alone
    clears the leftovers of a killed write, and clearing may give a checkpoint its name back (last.ckpt
    at step 6, moved aside by a publish killed between its renames). A rank choosing before rank 0
    has cleared would resume from step000004.ckpt: it waits, and both resume from step 6."""
    import threading

    monkeypatch.delenv(run_dir.ENV_RESUME, raising=False)
    ckpt_dir = tmp_path / "checkpoints"
    os.makedirs(ckpt_dir)
    save(ckpt_dir / "step000004.ckpt", 4)
    save(ckpt_dir / ".last.ckpt.old-9", 6)
    other = {}
    rank_1 = threading.Thread(target=lambda: other.update(
        start=run_dir.start_run(cfg_for(tmp_path, resume=True), FLAT, launching=False)))
    rank_1.start()
    rank_1.join(0.5)  # rank 0 starts later (its own pre-flight)
    assert rank_1.is_alive(), other  # waiting for the leftovers to go (without the wait: chose step 4 already)
    start = run_dir.start_run(cfg_for(tmp_path, resume=True), FLAT, launching=True)
    rank_1.join(10)
    assert (start.ckpt_path, start.step) == (str(ckpt_dir / "last.ckpt"), 6)
    assert (other["start"].ckpt_path, other["start"].step) == (str(ckpt_dir / "last.ckpt"), 6)


def test_leftovers_no_rank_0_clears_are_named_after_the_wait(tmp_path, monkeypatch):
    monkeypatch.delenv(run_dir.ENV_RESUME, raising=False)
    monkeypatch.setattr(run_dir, "CLEANUP_WAIT_S", 0.3)
    os.makedirs(tmp_path / "checkpoints")
    save(tmp_path / "checkpoints" / ".last.ckpt.tmp-9", 6)
    with pytest.raises(ConfigError, match=r"still holds leftovers .*\.last\.ckpt\.tmp-9.* every node shares"):
        run_dir.start_run(cfg_for(tmp_path, resume=True), FLAT, launching=False)
