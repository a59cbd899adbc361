"""Checkpoint folders of shards (``RingFSDPStrategy(save_distributed_checkpoint=True)``): written
whole or not at all, recognised as complete only when they are, read back without a process group.

A folder checkpoint is Lightning's (``ModelParallelStrategy.save_checkpoint``): the model and
optimizer shards written by ``torch.distributed.checkpoint`` (DCP: one ``__<rank>_0.distcp`` per
rank, then ``.metadata``, which names every tensor's byte range, written by the coordinator once
every rank has written), then ``meta.pt`` (``META_NAME``: everything else, the step, loops,
callbacks, the recorded config) from rank 0.

* **Whole or not at all.** Written in place, a save killed half-way over an earlier ``last.ckpt``
  would leave the earlier ``.metadata`` and ``meta.pt`` beside half the new shards: a folder that
  looks complete and holds two steps. The strategy writes into ``staging_path`` (``.<name>.tmp-<token>``
  beside it, the files' ``atomic_save`` mark) and ``publish`` renames it into place: an earlier
  folder first moves to ``.<name>.old-<pid>``, the new one takes its name, the old one is removed.
  A kill between the two renames leaves no ``<name>``, a complete staged folder (the newer step)
  and the ``.old-`` one: ``clean_folder_leftovers`` promotes the staged folder to ``<name>`` (a
  staged folder that is incomplete is removed and the ``.old-`` one put back instead). A file
  written over a folder (``atomic_save``, a run that switched to file checkpoints) moves the folder
  aside the same way, once the file is whole.
* **Complete.** ``folder_complete``: ``meta.pt`` and ``.metadata`` are there and every byte range
  ``.metadata`` names lies inside its shard file (a truncated shard fails it).
* **Room first.** ``no_space_error``: a folder is written beside the checkpoints it replaces, so
  the strategy compares the bytes of every rank's shards with the free space before it writes
  (one verdict, rank 0's) and refuses with the sizes and the overrides; a write that still fails
  removes its staged folder (a full disk is left as it was found).
* **Read back anywhere.** ``read_full_state`` reads the whole tensors of a folder in one process
  (no process group; DCP reassembles the shards of any number of ranks), for the weights-only
  resume and the consolidated export (``ring_lightning.app.export``).
"""

from __future__ import annotations

import glob
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

TMP_MARK = ".tmp-"  #: ``.<name>.tmp-<token>``: a write in progress (or killed), file or folder
OLD_MARK = ".old-"  #: ``.<name>.old-<pid>``: the checkpoint a finished folder write replaces
META_NAME = "meta.pt"  #: Lightning's metadata file in a folder (lightning.fabric.utilities.load)
DCP_METADATA = ".metadata"  #: torch.distributed.checkpoint's index of the shards
#: Bytes a folder of shards takes beyond its tensors (DCP's index, meta.pt; 0.4 MiB for the 3b
#: model) with room to spare: the space check's margin, and "full" when a write fails.
META_ALLOWANCE = 64 * 2**20


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the message names the checkpoint, the size and the space)."""


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def no_space_error(path: str, needed: float, free: float, what: str = "it needs") -> CheckpointWriteError:
    """The one message of a checkpoint that does not fit on its disk: the sizes, that nothing of
    the earlier checkpoints was lost, the overrides that make room, and how to continue."""
    dirpath = os.path.dirname(os.path.abspath(path))
    return CheckpointWriteError(
        28,  # errno.ENOSPC
        f"no space left to write checkpoint {path}: {what} {_size(needed)}, {_size(free)} are free in "
        f"{dirpath}. The earlier checkpoints there are intact. Free space (or lower "
        f"callbacks.model_checkpoint.save_top_k, or set callbacks.model_checkpoint.dirpath to a disk with "
        f"room), then continue with the same command + resume=true")


def state_bytes(state: Any) -> int:
    """Bytes of the tensors this process writes of a (nested) state: a DTensor's local shard."""
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    local = getattr(state, "to_local", None)
    tensor = local() if callable(local) else state
    return tensor.numel() * tensor.element_size() if hasattr(tensor, "element_size") else 0


def save_folder(strategy: Any, checkpoint: Dict[str, Any], filepath: Any) -> None:
    """Write ``checkpoint`` as a folder of shards at ``filepath``, whole or not at all, from every
    rank of ``strategy`` (a Lightning strategy: ``broadcast``, ``reduce``, ranks, ``root_device``,
    ``checkpoint_io``). The ``state_dict`` and ``optimizer_<i>`` shards go through DCP, the rest to
    ``meta.pt`` through the trainer's checkpoint writer, under ``staging_path``; rank 0 publishes
    the folder once every rank has written and it is complete. Every decision is one verdict that
    every rank reaches (a reduce or rank 0's broadcast), so no rank waits in a collective another
    one left: each failure raises on every rank, removes the staged folder and keeps the earlier
    checkpoints.

    Raises:
        CheckpointWriteError: no room for the folder (before writing) or the disk filled while writing.
        RuntimeError: the staged folder is incomplete as rank 0 sees it (node-local disks), or a
            rank failed to write or publish (its own error on that rank).
    """
    import torch
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save

    def total(value: float) -> float:  # over every rank; waits for all of them
        return float(strategy.reduce(torch.tensor(float(value), device=strategy.root_device), reduce_op="sum"))

    def rank0_free() -> int:
        return strategy.broadcast(shutil.disk_usage(dirpath).free if strategy.global_rank == 0 else None)

    def discard() -> None:
        if strategy.local_rank == 0:  # its node's staging folder (the one folder on a shared filesystem)
            shutil.rmtree(staged, ignore_errors=True)

    final = strategy.broadcast(os.path.abspath(os.fspath(filepath)))
    dirpath = os.path.dirname(final)
    staged = strategy.broadcast(staging_path(final, str(os.getpid())))  # rank 0's pid names it
    shards = {"state_dict": checkpoint.pop("state_dict"),
              **{f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))}}
    # Room first: the folder is written beside the checkpoints it replaces (whole or not at all),
    # and a disk filled half-way fails every rank with DCP's own error ("unexpected pos ...").
    needed = total(state_bytes(shards)) + META_ALLOWANCE
    os.makedirs(dirpath, exist_ok=True)  # a run's first save: the directory may not exist yet
    free = rank0_free()
    if free < needed:
        raise no_space_error(final, needed, free, "the folder of shards needs")
    error: Optional[Exception] = None
    try:
        os.makedirs(staged, exist_ok=True)
    except OSError as exc:
        error = exc
    if total(error is not None):  # before DCP's collectives: a rank that cannot write must not enter them
        discard()
        if error is not None:
            raise error
        raise RuntimeError(f"save_distributed_checkpoint=true: another rank could not create {staged} (its error "
                           f"is reported there); the earlier checkpoints are intact")
    try:
        _distributed_checkpoint_save(shards, Path(staged))
        if strategy.global_rank == 0:
            strategy.checkpoint_io.save_checkpoint(checkpoint, os.path.join(staged, META_NAME))
    except Exception as exc:  # noqa: BLE001 - judged below, by every rank alike
        error = exc
    if total(error is not None):  # a rank failing alone (rank 0's meta.pt) must not strand the others
        free = rank0_free()  # measured before any staging folder is removed: one message everywhere
        discard()
        if free < META_ALLOWANCE:  # DCP's error on a full disk names no errno
            raise no_space_error(final, needed, free, "the folder of shards needs") from error
        if error is not None:
            raise error
        raise RuntimeError(f"save_distributed_checkpoint=true: another rank failed to write its part of {staged} "
                           f"(its error is reported there); removed, the earlier checkpoints are intact")
    # Rank 0 sees every rank's shard only on a filesystem all ranks share (node-local disks: the
    # folder would never count as complete, and each node would keep its own staging folder).
    if not strategy.broadcast(folder_complete(staged) if strategy.global_rank == 0 else None):
        discard()
        raise RuntimeError(
            f"save_distributed_checkpoint=true: {staged} is incomplete as rank 0 sees it after every rank "
            f"wrote its shard (removed; the earlier checkpoints are intact); the checkpoint directory "
            f"must be on a filesystem every node shares "
            f"(callbacks.model_checkpoint.dirpath), or set strategy.save_distributed_checkpoint=false")
    error = None
    if strategy.global_rank == 0:
        try:
            publish(staged, final)  # a failure between its renames: clean_folder_leftovers repairs it
        except Exception as exc:  # noqa: BLE001 - every rank raises below
            error = exc
    if total(error is not None):
        if error is not None:
            raise error
        raise RuntimeError(f"save_distributed_checkpoint=true: rank 0 failed to publish {staged} as {final} "
                           f"(its error is reported there)")


def fsync_dir(dirpath: str) -> None:
    """Make a rename in ``dirpath`` durable (where the filesystem lets a directory be opened)."""
    try:
        fd = os.open(dirpath, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def staging_path(path: str, token: str) -> str:
    """Where a folder checkpoint for ``path`` is written before ``publish``: ``.<name>.tmp-<token>``
    beside it (hidden: the ``*.ckpt`` a resume looks at never match it)."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}{TMP_MARK}{token}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except OSError:
            pass


def publish(staged: str, path: str) -> None:
    """Rename the finished ``staged`` folder (or file) to ``path``; a checkpoint already there
    (folder or file) moves aside first and is removed once the new one has its name (module
    docstring)."""
    path = os.path.abspath(os.fspath(path))
    dirpath = os.path.dirname(path)
    old = None
    if os.path.lexists(path):
        old = os.path.join(dirpath, f".{os.path.basename(path)}{OLD_MARK}{os.getpid()}")
        _remove(old)
        os.replace(path, old)
    os.replace(staged, path)
    fsync_dir(dirpath)
    if old is not None:
        _remove(old)


def _target(leftover: str, mark: str) -> str:
    """``<dir>/<name>`` of a leftover ``<dir>/.<name><mark><token>``."""
    return os.path.join(os.path.dirname(leftover), os.path.basename(leftover)[1:].split(mark)[0])


def clean_folder_leftovers(dirpath: str) -> List[str]:
    """Finish or undo the folder publishes of a killed run (module docstring): a complete staged
    folder whose ``<name>`` is missing takes it (the newest of them, by step, when there are several);
    every other staged folder is removed; a replaced checkpoint whose name is still free after that
    is renamed back, the others removed. Returns the paths touched. Call it only while no run writes
    in ``dirpath`` (the run-dir lock), in one process
    (rank 0; the other ranks wait for it before they choose: ring_lightning/app/run_dir.py)."""
    touched = []
    staged = [p for p in glob.glob(os.path.join(dirpath, f".*.ckpt{TMP_MARK}*")) if os.path.isdir(p)]
    meta = {p: folder_meta(p) for p in staged}
    # the newest complete candidate first: it takes a free name, the rest find it taken
    for path in sorted(staged, key=lambda p: (meta[p] is not None, (meta[p] or {}).get("global_step", -1)),
                       reverse=True):
        target = _target(path, TMP_MARK)
        if meta[path] is not None and not os.path.lexists(target):
            os.replace(path, target)
            fsync_dir(dirpath)
        else:
            _remove(path)
        touched.append(path)
    for path in sorted(glob.glob(os.path.join(dirpath, f".*.ckpt{OLD_MARK}*"))):
        target = _target(path, OLD_MARK)
        # what publish moved aside was a published checkpoint: a folder (complete unless its removal
        # had begun) or a file (atomic_save's, whole); a file removed here would lose the only copy
        if not os.path.lexists(target) and (folder_complete(path) if os.path.isdir(path) else os.path.isfile(path)):
            os.replace(path, target)
        else:
            _remove(path)
        touched.append(path)
    return sorted(touched)


def folder_complete(path: str) -> bool:
    """A whole folder checkpoint: ``meta.pt`` and ``.metadata`` present, every byte range the
    shards' index names inside its file."""
    if not (os.path.isfile(os.path.join(path, META_NAME)) and os.path.isfile(os.path.join(path, DCP_METADATA))):
        return False
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception:  # noqa: BLE001 - an index that does not read means: not complete
        return False
    sizes: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        shard = os.path.join(path, info.relative_path)
        if shard not in sizes:
            sizes[shard] = os.path.getsize(shard) if os.path.isfile(shard) else -1
        if sizes[shard] < info.offset + info.length:
            return False
    return True


def folder_meta(path: str) -> Optional[Dict[str, Any]]:
    """``meta.pt`` of a complete folder (``weights_only``), or None."""
    import torch

    if not folder_complete(path):
        return None
    try:
        return torch.load(os.path.join(path, META_NAME), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure to load means: not a checkpoint to resume
        return None


def read_full_state(path: str, keys: Optional[Set[str]] = None) -> Dict[str, Any]:
    """The whole tensors of a folder checkpoint in this process: ``{"state_dict": {name: tensor},
    "optimizer_0": {"state": {name: {...}}, "param_groups": [...]}, ...}`` (``keys``: only these
    top-level entries). The shards of any number of ranks are reassembled; no process group."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        return _load_state_dict_from_keys(keys, checkpoint_id=os.fspath(path))
