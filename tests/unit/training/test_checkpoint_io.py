"""Checkpoint files (ring_lightning/training/checkpoint_io.py): written in their own directory, never through
TMPDIR; loadable with weights_only whatever the config held; a full disk named in one message with
the earlier checkpoints intact; resume picks the newest by step, never by name or time."""

import errno
import os
import tempfile

import pytest
import torch
from omegaconf import OmegaConf

from ring_lightning.training import checkpoint_io
from ring_lightning.parallel.sharded_checkpoint import CheckpointWriteError
from ring_lightning.training.checkpoint_io import (AtomicCheckpointIO, checkpoint_step, clean_leftovers,
                                                   newest_checkpoint)


def a_checkpoint(step: int, **extra) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64,), float(step))}, **extra}


def test_omegaconf_containers_are_saved_as_plain_lists_and_load_with_weights_only(tmp_path):
    path = tmp_path / "a.ckpt"
    paths = OmegaConf.create({"paths": ["a.txt", "b.txt"]}).paths  # what Hydra's instantiate hands over
    AtomicCheckpointIO().save_checkpoint(a_checkpoint(3, datamodule_hyper_parameters={"paths": paths,
                                                                                      "where": tmp_path}), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["datamodule_hyper_parameters"] == {"paths": ["a.txt", "b.txt"], "where": str(tmp_path)}
    assert checkpoint_step(str(path)) == 3 and checkpoint_io.readable(str(path))


def test_saving_never_touches_tmpdir(tmp_path, monkeypatch):
    """Every temporary-file maker of the standard library fails (a TMPDIR with no space): the
    write still succeeds, in the checkpoint directory itself. Lightning's own writer fails here."""
    def no_tmp(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device (TMPDIR)")

    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile", "SpooledTemporaryFile"):
        monkeypatch.setattr(tempfile, name, no_tmp)
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    with pytest.raises(OSError):
        TorchCheckpointIO().save_checkpoint(a_checkpoint(1), tmp_path / "lightning.ckpt")  # the old path: TMPDIR
    AtomicCheckpointIO().save_checkpoint(a_checkpoint(1), tmp_path / "ours.ckpt")
    assert checkpoint_step(str(tmp_path / "ours.ckpt")) == 1
    assert "lightning.ckpt" not in os.listdir(tmp_path)


def test_a_full_disk_is_one_message_and_leaves_only_the_earlier_checkpoints(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint(a_checkpoint(2), tmp_path / "step000002.ckpt")
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):  # the sink that counts the size still works
        if isinstance(f, checkpoint_io._ByteCounter):
            return real_save(obj, f, *args, **kwargs)
        f.write(b"x" * 1000)  # part of the file made it before the disk filled
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError) as err:
        io.save_checkpoint(a_checkpoint(4), tmp_path / "step000004.ckpt")
    message = str(err.value.strerror)
    assert f"no space left to write checkpoint {tmp_path / 'step000004.ckpt'}" in message
    assert "MiB, " in message and "are free in" in message and "resume=true" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # one message, no chained traceback
    assert sorted(os.listdir(tmp_path)) == ["step000002.ckpt"]  # no partial file, the earlier one intact
    assert checkpoint_step(str(tmp_path / "step000002.ckpt")) == 2


def test_resume_picks_the_newest_by_step_not_by_name_or_time(tmp_path):
    """A crash between stepN.ckpt and last.ckpt leaves last.ckpt older than stepN: stepN wins.
    A damaged file and a checkpoint a weights_only load refuses are skipped and named."""
    io = AtomicCheckpointIO()
    io.save_checkpoint(a_checkpoint(10), tmp_path / "step000010.ckpt")
    io.save_checkpoint(a_checkpoint(5), tmp_path / "last.ckpt")  # written last, holds the older step
    (tmp_path / "step000020.ckpt").write_bytes((tmp_path / "step000010.ckpt").read_bytes()[:300])  # cut off
    torch.save({"global_step": 30, "obj": OmegaConf.create({"a": 1})}, tmp_path / "step000030.ckpt")  # unsafe
    path, step, damaged = newest_checkpoint(str(tmp_path))
    assert (path, step) == (str(tmp_path / "step000010.ckpt"), 10)
    assert damaged == [str(tmp_path / "step000020.ckpt"), str(tmp_path / "step000030.ckpt")]
    io.save_checkpoint(a_checkpoint(10), tmp_path / "last.ckpt")
    assert newest_checkpoint(str(tmp_path))[0] == str(tmp_path / "last.ckpt")  # a tie: last.ckpt


def test_leftovers_of_a_killed_write_are_removed(tmp_path):
    (tmp_path / ".last.ckpt.tmp-1234").write_bytes(b"partial")
    (tmp_path / "step000004.ckpt.tmp").write_bytes(b"partial")  # the earlier writer's name
    AtomicCheckpointIO().save_checkpoint(a_checkpoint(2), tmp_path / "step000002.ckpt")
    assert clean_leftovers(str(tmp_path)) == sorted([str(tmp_path / ".last.ckpt.tmp-1234"),
                                                     str(tmp_path / "step000004.ckpt.tmp")])
    assert os.listdir(tmp_path) == ["step000002.ckpt"]


def test_a_dataclass_in_the_hyper_parameters_loads_with_weights_only(tmp_path):
    """LongDocumentLM(model=ModelConfig(...)) keeps the dataclass in its hparams (the plugin route)."""
    from ring_lightning.models.model_config import ModelConfig

    path = tmp_path / "a.ckpt"
    AtomicCheckpointIO().save_checkpoint(a_checkpoint(4, hyper_parameters={"model": ModelConfig()}), path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["hyper_parameters"]["model"]["vocab_size"] == 259 and checkpoint_step(str(path)) == 4
