"""Checkpoint files: written whole or not at all, readable with ``weights_only=True``, chosen by step.

* ``AtomicCheckpointIO`` (``conf/trainer/default.yaml``: ``plugins``) writes a checkpoint to a
  temporary file *in the checkpoint directory itself* (``.<name>.tmp-<pid>``), fsyncs it and
  renames it into place, so a crash never leaves a truncated ``.ckpt`` and nothing is staged in
  ``TMPDIR`` (Lightning's own writer serialises to memory and then goes through an fsspec
  transaction whose temporary file lives in ``TMPDIR``: an 8 MB ``/tmp`` failed a 20 MB save
  with 74 GB free beside the run). Before writing, OmegaConf containers (``ListConfig`` in
  ``data.paths``, from Hydra's ``instantiate``) and paths become plain lists, dicts and strings,
  so every checkpoint loads with ``torch.load(weights_only=True)``. A full disk raises
  ``CheckpointWriteError``: one message naming the file, the size needed and the space left;
  the partial temporary is removed and the earlier checkpoints stay.
* ``checkpoint_step`` is the real load (``weights_only=True``, memory-mapped: no tensor is read)
  and returns the checkpoint's ``global_step``; ``readable`` adds the zip's CRC check.
* ``newest_checkpoint`` picks what ``resume=true`` continues: the newest *by step* among the
  checkpoints that load (never by file name or time), ``last.ckpt`` on a tie, so a crash
  between ``stepN.ckpt`` and ``last.ckpt`` cannot send a resume back.
* ``clean_leftovers`` removes the temporaries of a write that was killed.
* A checkpoint may also be a **folder of shards** (``RingFSDPStrategy(save_distributed_checkpoint=True)``,
  written whole or not at all: ring_lightning/parallel/sharded_checkpoint.py). Everything here
  takes one where it takes a file: ``checkpoint_step`` reads its ``meta.pt`` once the folder is
  complete, ``readable`` checks every shard's byte ranges instead of a CRC, ``newest_checkpoint``
  chooses among files and folders alike, ``clean_leftovers`` removes killed folder writes too.
"""

from __future__ import annotations

import errno
import glob
import dataclasses
import os
import shutil
import zipfile
from collections import OrderedDict
from typing import Any, List, Optional, Tuple

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ring_lightning.parallel.sharded_checkpoint import (META_NAME, OLD_MARK, TMP_MARK, clean_folder_leftovers,
                                                        folder_complete, folder_meta, fsync_dir, no_space_error,
                                                        publish, read_full_state)


def plain(value: Any) -> Any:
    """``value`` with OmegaConf containers and paths turned into lists, dicts and strings (what a
    ``weights_only`` load accepts); tensors and every other leaf returned as they are."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):  # an OrderedDict (a state_dict) stays one: a weights_only load accepts it
        items = [(k, plain(v)) for k, v in value.items()]
        return OrderedDict(items) if isinstance(value, OrderedDict) else dict(items)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(plain(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # e.g. a ModelConfig in hparams
        return plain(dataclasses.asdict(value))
    return value


class _ByteCounter:
    """A write-only sink that counts what ``torch.save`` would write."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def atomic_save(checkpoint: Any, path: str) -> None:
    """``torch.save`` to ``.<name>.tmp-<pid>`` beside ``path``, fsync, rename into place. A folder
    checkpoint at ``path`` (a run that switched from ``save_distributed_checkpoint=true``) is
    replaced only once the file is whole: moved aside, then removed (``publish``).

    Raises:
        CheckpointWriteError: the disk is full (or over quota); the partial file is removed.
        IsADirectoryError: ``path`` is a folder that is not a checkpoint (no ``meta.pt``).
    """
    path = os.fspath(path)
    dirpath = os.path.dirname(os.path.abspath(path))
    os.makedirs(dirpath, exist_ok=True)
    folder = os.path.isdir(path) and not os.path.islink(path)
    if folder and not os.path.isfile(os.path.join(path, META_NAME)):
        raise IsADirectoryError(f"checkpoint path {path} is a folder that holds no checkpoint ({META_NAME}); "
                                f"move it away or choose another callbacks.model_checkpoint.dirpath")
    tmp = os.path.join(dirpath, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        if folder:
            publish(tmp, path)  # a kill between its renames: clean_leftovers puts a whole file or folder back
        else:
            os.replace(tmp, path)  # atomic on one filesystem: readers see the old file or the new one
    except BaseException as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            counter = _ByteCounter()
            torch.save(checkpoint, counter)
            raise no_space_error(path, counter.size, shutil.disk_usage(dirpath).free) from None
        raise
    fsync_dir(dirpath)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint writer, made atomic in the checkpoint's own directory and
    ``weights_only``-loadable (see the module docstring)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got "
                            f"{storage_options!r}")
        atomic_save(plain(checkpoint), path)


# ---------------------------------------------------------------------- reading back
def checkpoint_metadata(path: str) -> Optional[dict]:
    """Everything a checkpoint holds besides its tensors' contents, through the real load
    (``weights_only=True``; a file memory-mapped, so no tensor is read; a folder's ``meta.pt``,
    once the folder is complete), or None when it does not load (truncated, not a checkpoint,
    holding objects a safe load refuses, a folder whose save was cut short)."""
    if os.path.isdir(path):
        return folder_meta(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any failure to load means: not a checkpoint to resume
        return None


def checkpoint_weights(path: str) -> dict:
    """The checkpoint's ``state_dict`` (the LightningModule's keys), read whole in this process: a
    file memory-mapped with ``weights_only``, a folder of shards through its index (no process group)."""
    if os.path.isdir(path):
        return read_full_state(path, {"state_dict"})["state_dict"]
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]


def checkpoint_step(path: str) -> Optional[int]:
    """The checkpoint's (file's or folder's) ``global_step``, or None when it does not load."""
    checkpoint = checkpoint_metadata(path)
    try:
        return None if checkpoint is None else int(checkpoint.get("global_step", 0))
    except (AttributeError, TypeError, ValueError):  # loads, but is no checkpoint
        return None


def readable(path: str) -> bool:
    """A complete checkpoint: every zip member passes its CRC (a folder: every shard holds the
    byte ranges its index names) and it loads with ``weights_only``."""
    if os.path.isdir(path):
        return folder_complete(path) and checkpoint_step(path) is not None
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                return False
    except (OSError, zipfile.BadZipFile):
        return False
    return checkpoint_step(path) is not None


def newest_checkpoint(dirpath: str) -> Tuple[Optional[str], Optional[int], List[str]]:
    """(checkpoint to resume from or None, its step, the files that do not load) of ``dirpath``:
    the highest ``global_step`` among the ``*.ckpt`` (files or folders) that load; on a tie
    ``last.ckpt``, then the newest."""
    steps, damaged = [], []
    for path in glob.glob(os.path.join(dirpath, "*.ckpt")):
        step = checkpoint_step(path)
        if step is None:
            damaged.append(path)
        else:
            steps.append((step, os.path.basename(path) == "last.ckpt", os.path.getmtime(path), path))
    for step, _, _, path in sorted(steps, reverse=True):
        if readable(path):  # the CRC check reads the file: only as far as the first good one
            return path, step, sorted(damaged)
        damaged.append(path)
    return None, None, sorted(damaged)


def newest_valid_checkpoint(dirpath: str, preferred: Optional[str] = None) -> tuple:
    """(checkpoint to resume from or None, the damaged files skipped): ``newest_checkpoint``
    (``preferred`` is kept for callers of the earlier signature; the step decides)."""
    path, _, damaged = newest_checkpoint(dirpath)
    return path, damaged


LEFTOVER_PATTERNS = (f".*.ckpt{TMP_MARK}*", f".*.ckpt{OLD_MARK}*", "*.ckpt.tmp")


def leftovers(dirpath: str) -> List[str]:
    """What ``clean_leftovers`` would clear in ``dirpath`` (killed writes, files and folders)."""
    return sorted(p for pattern in LEFTOVER_PATTERNS for p in glob.glob(os.path.join(dirpath, pattern)))


def clean_leftovers(dirpath: str) -> List[str]:
    """Remove the temporaries of checkpoint writes that were killed (``.<name>.tmp-<pid>``, and
    ``<name>.tmp`` of the earlier writer; folders: ``clean_folder_leftovers``); returns the paths
    removed. Call it only while no run writes in ``dirpath`` (the run-dir lock), in one process (rank 0:
    ``run_dir.wait_for_cleanup``)."""
    removed = clean_folder_leftovers(dirpath)
    for pattern in (f".*.ckpt{TMP_MARK}*", "*.ckpt.tmp"):
        for path in glob.glob(os.path.join(dirpath, pattern)):
            if os.path.isdir(path):
                continue  # a folder's: clean_folder_leftovers
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return sorted(removed)
