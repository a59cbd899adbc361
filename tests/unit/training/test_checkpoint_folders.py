"""Checkpoint folders of shards (ring_lightning/parallel/sharded_checkpoint.py, read through
ring_lightning/training/checkpoint_io.py): complete only when every piece is there, chosen by
resume=true by step among files and folders, published whole over an earlier one, cleaned or put
back after a killed write; exported as one plain state_dict (ring_lightning/app/export.py)."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ring_lightning.app.export import consolidated_state_dict, main as export_main
from ring_lightning.app.resume_compat import CONFIG_KEY, load_weights, saved_config
from ring_lightning.parallel.sharded_checkpoint import (META_NAME, clean_folder_leftovers, folder_complete, publish,
                                                         read_full_state, staging_path)
from ring_lightning.training.checkpoint_io import (AtomicCheckpointIO, checkpoint_step, clean_leftovers, newest_checkpoint,
                                                  readable)

# dcp.save in one process, as a test builds a folder here: "assuming the intent is to save in a single process"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def weights(step: int) -> dict:
    return {"model.w": torch.full((64,), float(step)), "model.b": torch.arange(8.0) + step}


def a_folder(path, step: int, meta: bool = True) -> str:
    """A folder as RingFSDPStrategy writes it (one process here: DCP needs no process group)."""
    path = str(path)
    dcp.save({"state_dict": weights(step), "optimizer_0": {"state": {"model.w": {"exp_avg": torch.ones(64) * step}},
                                                           "param_groups": [{"lr": 0.1, "params": ["model.w"]}]}},
             checkpoint_id=path)
    if meta:
        AtomicCheckpointIO().save_checkpoint({"global_step": step, CONFIG_KEY: {"model.dim": 8}},
                                             os.path.join(path, META_NAME))
    return path


def test_a_complete_folder_is_a_checkpoint_of_its_step(tmp_path):
    path = a_folder(tmp_path / "last.ckpt", 7)
    assert folder_complete(path) and readable(path) and checkpoint_step(path) == 7
    assert saved_config(path) == {"model.dim": 8}
    state = read_full_state(path)
    assert torch.equal(state["state_dict"]["model.w"], weights(7)["model.w"])
    assert torch.equal(state["optimizer_0"]["state"]["model.w"]["exp_avg"], torch.ones(64) * 7)


@pytest.mark.parametrize("damage", ["no_meta", "no_index", "short_shard", "no_shard"])
def test_a_folder_missing_a_piece_is_not_a_checkpoint(tmp_path, damage):
    path = a_folder(tmp_path / "last.ckpt", 7, meta=damage != "no_meta")
    shard = next(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".distcp"))
    if damage == "no_index":
        os.remove(os.path.join(path, ".metadata"))
    elif damage == "short_shard":
        with open(shard, "r+b") as f:
            f.truncate(os.path.getsize(shard) - 1)
    elif damage == "no_shard":
        os.remove(shard)
    assert not folder_complete(path) and not readable(path) and checkpoint_step(path) is None
    assert newest_checkpoint(str(tmp_path)) == (None, None, [path])


def test_resume_takes_the_newest_step_among_files_and_folders(tmp_path):
    AtomicCheckpointIO().save_checkpoint({"global_step": 5, "state_dict": weights(5)}, str(tmp_path / "step000005.ckpt"))
    folder = a_folder(tmp_path / "last.ckpt", 9)
    a_folder(tmp_path / "step000012.ckpt", 12, meta=False)  # cut short before meta.pt: skipped
    path, step, damaged = newest_checkpoint(str(tmp_path))
    assert (path, step) == (folder, 9) and damaged == [str(tmp_path / "step000012.ckpt")]


def test_publish_replaces_an_earlier_checkpoint_whole(tmp_path):
    final = str(tmp_path / "last.ckpt")
    a_folder(final, 3)
    staged = a_folder(staging_path(final, "123"), 6)
    assert os.path.basename(staged) == ".last.ckpt.tmp-123"
    assert newest_checkpoint(str(tmp_path))[:2] == (final, 3)  # a staged folder is never chosen
    publish(staged, final)
    assert checkpoint_step(final) == 6 and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    AtomicCheckpointIO().save_checkpoint({"global_step": 8, "state_dict": weights(8)}, str(tmp_path / "x.ckpt"))
    publish(a_folder(staging_path(str(tmp_path / "x.ckpt"), "1"), 9), str(tmp_path / "x.ckpt"))  # over a file
    assert os.path.isdir(tmp_path / "x.ckpt") and checkpoint_step(str(tmp_path / "x.ckpt")) == 9


def test_leftovers_of_killed_folder_writes_are_removed_or_put_back(tmp_path):
    a_folder(tmp_path / ".step000004.ckpt.tmp-77", 4, meta=False)  # killed while writing
    a_folder(tmp_path / "last.ckpt", 6)
    a_folder(tmp_path / ".last.ckpt.old-77", 5)  # replaced, its removal killed
    a_folder(tmp_path / ".step000002.ckpt.old-77", 2)  # killed between the two renames: no step000002.ckpt
    touched = clean_leftovers(str(tmp_path))
    assert len(touched) == 3 and sorted(os.listdir(tmp_path)) == ["last.ckpt", "step000002.ckpt"]
    assert checkpoint_step(str(tmp_path / "last.ckpt")) == 6 and checkpoint_step(str(tmp_path / "step000002.ckpt")) == 2
    assert clean_folder_leftovers(str(tmp_path)) == []


def test_export_writes_a_plain_state_dict_from_a_folder_or_a_file(tmp_path, capsys):
    folder = a_folder(tmp_path / "last.ckpt", 4)
    file = str(tmp_path / "step.ckpt")
    AtomicCheckpointIO().save_checkpoint({"global_step": 4, "state_dict": weights(4)}, file)
    for source in (folder, file):
        assert consolidated_state_dict(source).keys() == weights(4).keys()
        out = str(tmp_path / "model.pt")
        assert export_main([source, out, "--prefix", "model."]) == 0
        bare = torch.nn.Module()
        bare.w, bare.b = torch.nn.Parameter(torch.zeros(64)), torch.nn.Parameter(torch.zeros(8))
        bare.load_state_dict(torch.load(out, weights_only=True), strict=True)
        assert torch.equal(bare.w, weights(4)["model.w"]) and torch.equal(bare.b, weights(4)["model.b"])
    assert export_main([folder, str(tmp_path / "x.pt"), "--prefix", "head."]) == 2
    assert "no key" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        consolidated_state_dict(a_folder(tmp_path / "cut.ckpt", 1, meta=False))


def test_weights_only_resume_reads_a_folder(tmp_path):
    module = torch.nn.Module()
    module.model = torch.nn.Module()
    module.model.w, module.model.b = torch.nn.Parameter(torch.zeros(64)), torch.nn.Parameter(torch.zeros(8))
    load_weights(module, a_folder(tmp_path / "last.ckpt", 3))
    assert torch.equal(module.model.w, weights(3)["model.w"])


def test_a_rollback_sets_newer_folders_aside(tmp_path):
    from ring_lightning.app.run_dir import set_aside_newer

    older = a_folder(tmp_path / "step000004.ckpt", 4)
    a_folder(tmp_path / "step000006.ckpt", 6)
    a_folder(tmp_path / "last.ckpt", 7)
    notes = set_aside_newer(str(tmp_path), older, 4)
    assert "2 checkpoint(s) of later steps moved" in notes[0]
    assert newest_checkpoint(str(tmp_path))[:2] == (older, 4)
    aside = next(p for p in tmp_path.iterdir() if p.name.startswith("abandoned-"))
    assert sorted(p.name for p in aside.iterdir()) == ["last.ckpt", "step000006.ckpt"]


@pytest.mark.parametrize("staged_complete", [pytest.param(False, id="staged_cut_short"),
                                             pytest.param(True, id="staged_whole")])
def test_a_publish_killed_between_its_renames_keeps_the_newest_whole_checkpoint(tmp_path, staged_complete):
    """last.ckpt a file (save_distributed_checkpoint was false), the new folder's publish killed
    between its two renames: no last.ckpt, the file aside, the staged folder. The staged folder
    whole (its step 7 is the newest) takes the name; cut short, the file is the only whole
    checkpoint left and comes back."""
    AtomicCheckpointIO().save_checkpoint({"global_step": 5, "state_dict": weights(5)}, str(tmp_path / ".last.ckpt.old-42"))
    a_folder(staging_path(str(tmp_path / "last.ckpt"), "42"), 7, meta=staged_complete)
    assert len(clean_leftovers(str(tmp_path))) == 2
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    assert newest_checkpoint(str(tmp_path))[:2] == (str(tmp_path / "last.ckpt"), 7 if staged_complete else 5)
    assert os.path.isdir(tmp_path / "last.ckpt") is staged_complete


def test_a_whole_staged_folder_whose_name_is_free_is_promoted_the_newest_first(tmp_path):
    """Killed after every rank wrote (the folder complete) and before its publish: the first save of
    the run (no last.ckpt yet) is kept; of two whole staged folders for one name, the newer step wins."""
    a_folder(staging_path(str(tmp_path / "step000003.ckpt"), "7"), 3)
    a_folder(staging_path(str(tmp_path / "last.ckpt"), "7"), 9)
    a_folder(staging_path(str(tmp_path / "last.ckpt"), "8"), 6)
    a_folder(staging_path(str(tmp_path / "last.ckpt"), "9"), 12, meta=False)  # cut short: removed
    assert len(clean_leftovers(str(tmp_path))) == 4
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "step000003.ckpt"]
    assert checkpoint_step(str(tmp_path / "last.ckpt")) == 9 and checkpoint_step(str(tmp_path / "step000003.ckpt")) == 3
    assert newest_checkpoint(str(tmp_path))[:2] == (str(tmp_path / "last.ckpt"), 9)


def _failing_save(*args, **kwargs):
    raise RuntimeError("simulated write failure")


@pytest.mark.parametrize("writer", [pytest.param("ring", id="strategy_ring"),
                                    pytest.param("ring_fsdp_file", id="strategy_ring_fsdp_gathered_file")])
def test_a_file_written_over_a_folder_replaces_it_only_once_whole(tmp_path, monkeypatch, writer):
    """A run that switched from folder checkpoints to files (strategy=ring, or ring_fsdp with
    save_distributed_checkpoint=false) over the same run dir: a failed write of last.ckpt leaves the
    folder whole (Lightning's ModelParallelStrategy removed it first); a whole one replaces it."""
    from ring_lightning.parallel.fsdp import RingFSDPStrategy

    final = str(tmp_path / "last.ckpt")
    a_folder(final, 3)
    if writer == "ring":  # RingStrategy (DDP): rank 0 hands the file to the trainer's writer
        save = AtomicCheckpointIO().save_checkpoint
    else:
        strategy = RingFSDPStrategy(save_distributed_checkpoint=False)
        strategy.checkpoint_io = AtomicCheckpointIO()
        save = strategy.save_checkpoint
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", _failing_save)
        with pytest.raises(RuntimeError, match="simulated write failure"):
            save({"global_step": 5, "state_dict": weights(5)}, final)
    assert os.path.isdir(final) and checkpoint_step(final) == 3 and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    save({"global_step": 5, "state_dict": weights(5)}, final)
    assert os.path.isfile(final) and checkpoint_step(final) == 5 and sorted(os.listdir(tmp_path)) == ["last.ckpt"]
    os.makedirs(tmp_path / "notes.ckpt")  # a folder that is no checkpoint is never replaced
    with pytest.raises(IsADirectoryError, match="holds no checkpoint"):
        AtomicCheckpointIO().save_checkpoint({"global_step": 6}, str(tmp_path / "notes.ckpt"))
