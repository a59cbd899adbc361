"""The run's own log: what each rank prints also lands in the run directory.

``<run dir>/train.log`` holds rank 0's output (pre-flight notes, progress lines, warnings,
the summary, a traceback) and ``train_ddp_process_<k>.log`` rank k's (Lightning's own naming
for the ranks it starts, so the file Hydra opens for such a rank is the one written), so a
rank's own words are there when the launcher reports it lost. Hydra's own log records go to
the same file (its ``hydra.job_logging`` file handler).

How: ``sys.stdout`` and ``sys.stderr`` are wrapped in a tee that writes to the console as
before and appends to the rank's file. ``train.py`` starts it when a job begins (ranks that
Lightning re-launches run ``train.py`` too), and ``RunLog``, a callback, points it at the
right file in every rank once the ranks are known: spawned ranks (sweeps) run no ``train.py``
and get theirs there. Redraws of tqdm's bar (carriage returns, cursor codes) are left out of
the file; the plain progress lines (output not a terminal, ``console.LineProgressBar``) are in.
Known third-party noise (``console.is_noise``) is dropped from both.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from typing import IO, Any, Optional

from lightning.pytorch.callbacks import Callback

from ring_lightning.training.console import is_noise

_RANK_SUFFIX = re.compile(r"_ddp_process_\d+$")


def log_path(run_dir: str, job_name: str, rank: int) -> str:
    """``<run_dir>/<job>.log`` for rank 0, ``<job>_ddp_process_<rank>.log`` for the others."""
    base = _RANK_SUFFIX.sub("", job_name or "train")
    return os.path.join(run_dir, f"{base}.log" if rank == 0 else f"{base}_ddp_process_{rank}.log")


class _Tee:
    """A text stream writing to ``stream`` and to the current log file (when one is set)."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.file: Optional[IO[str]] = None

    def write(self, text: str) -> int:
        if is_noise(text):
            return len(text)
        n = self._stream.write(text)
        if self.file is not None and "\r" not in text and "\x1b[" not in text:
            try:
                self.file.write(text)
                self.file.flush()
            except (OSError, ValueError):  # the run dir vanished or the file was closed: the console still works
                self.file = None
        return n

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ... of the real stream
        return getattr(self._stream, name)


_current: dict = {"path": None, "file": None}


def start(path: str, rank: int = 0) -> None:
    """Copy this process's stdout and stderr into ``path`` (appended) from now on; a later call
    moves the copy to another file (the next job of a sweep, or the rank's own file). A new
    file starts with one line naming the rank, its process and host."""
    path = os.path.abspath(path)
    if _current["path"] == path:
        return
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), _Tee):
            setattr(sys, name, _Tee(getattr(sys, name)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    old, new = _current["file"], open(path, "a", buffering=1, encoding="utf-8", errors="replace")
    if new.tell() == 0:
        new.write(f"== ring_lightning rank {rank} (pid {os.getpid()}, host {socket.gethostname()}, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}): {' '.join(sys.argv)}\n")
    sys.stdout.file = sys.stderr.file = new
    _current.update(path=path, file=new)
    if old is not None:
        old.close()


def launch_rank() -> int:
    """This process's rank as the launcher announced it (torchrun, SLURM, Lightning's ranks), else 0."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


class RunLog(Callback):
    """Points the output copy at this rank's file in every rank, spawned ones included.

    Args:
        run_dir: the run directory (train.py: ``paths.output_dir``).
        job_name: Hydra's job name (``train``; Lightning's ranks get ``train_ddp_process_<k>``).
    """

    def __init__(self, run_dir: str, job_name: str = "train") -> None:
        self.run_dir, self.job_name = str(run_dir), str(job_name)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        start(log_path(self.run_dir, self.job_name, trainer.global_rank), trainer.global_rank)
