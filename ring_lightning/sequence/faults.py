"""What went wrong when a rank is lost: one clear message instead of a backend's traceback.

A collective fails on the surviving ranks when a peer dies (its sockets close: gloo says
"Connection closed by peer", NCCL reports a remote error) or stops answering (the backend's
timeout). ``peer_failure`` tells the two apart; ``lost_rank_message`` names the lost rank
where this process can know it: ranks started by Lightning's launcher are rank 0's children,
so rank 0 reads their exit status, and a child sees that rank 0 is gone when its parent
changes. Under torchrun or SLURM the agent names the failed rank itself.

After a lost rank, the job must not leave orphans: ``stop_local_ranks`` ends the ranks rank 0
started (a frozen one would otherwise wait in a collective for the backend's timeout, or
forever). Lightning's own child observer also ends the job a few seconds after a child
fails; this module only makes sure the user reads why (docs/ARCHITECTURE.md, "Runs that
survive").

A rank that fails with its own exception (a bug, a data error, a full disk) is not a lost rank:
``callbacks.FailureRecord`` notes it in the run directory (``.ring_lightning/failed-rank<N>``, written in
``on_exception``, before the process group goes), the failing rank reports its exception, and
a peer whose collective then breaks finds the note (``failed_peers``) and says one line
instead of the lost-rank message.
"""

from __future__ import annotations

import glob
import hashlib
import os
import signal
import tempfile
import time
from typing import List, Optional, Tuple

_CONNECTION = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
               "remote process exited", "connection refused", "ncclremoteerror")
_TIMEOUT = ("timed out waiting", "application timeout caused pair closure", "did not complete within",
            "watchdog caught collective operation timeout", "operation timed out")
_PARENT = os.getppid()  # a rank Lightning started is a child of rank 0


def _from_a_collective(exc: BaseException) -> bool:
    """Raised by torch.distributed (or the ring's own transfers), not by other network code
    (the hub, wandb) that runs inside ``fit`` too."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())) or type(exc).__name__ == "RingCommunicationError":
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in ("gloo", "nccl", "pair closure", "processgroup"))


def peer_failure(exc: BaseException) -> Optional[str]:
    """``"connection"`` (a peer process went away), ``"timeout"`` (a peer stopped answering),
    or ``None`` (not a lost peer), read from the collective errors in the exception's chain."""
    seen = exc
    while seen is not None:
        if _from_a_collective(seen):
            text = str(seen).lower()
            if any(marker in text for marker in _CONNECTION):
                return "connection"
            if any(marker in text for marker in _TIMEOUT):
                return "timeout"
        seen = seen.__cause__ or seen.__context__
    return None


def first_line(exc: BaseException) -> str:
    """The backend's own words, shortened: kept beside our message, never replaced by it."""
    line = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    return f"{type(exc).__name__}: {line[:300]}"


def describe_exit(returncode: int) -> str:
    """How a process ended, in words (``killed by SIGKILL``, ``exited with status 1``)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (the out-of-memory killer and `kill -9` send it)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    return f"exited with status {returncode}"


def _ended_children(launcher, wait_s: float) -> List[str]:
    """``rank N (pid P) <how it ended>`` for each child rank that has ended, waiting up to ``wait_s``
    for one to (a peer's death and our error arrive close together, in either order)."""
    procs = list(getattr(launcher, "procs", None) or [])
    deadline = time.monotonic() + wait_s
    while True:
        ended = [(rank, p) for rank, p in enumerate(procs, start=1) if p.poll() is not None and p.returncode != 0]
        if ended or time.monotonic() >= deadline or not procs:
            return [f"rank {rank} (pid {p.pid}) {describe_exit(p.returncode)}" for rank, p in ended]
        time.sleep(0.1)


def lost_rank_message(kind: str, global_rank: int, launcher, step: int) -> str:
    """One paragraph: which rank was lost and how, as far as this rank can tell."""
    if global_rank == 0:
        ended = _ended_children(launcher, wait_s=3.0)
        who = "; ".join(ended) if ended else "another rank"
    elif os.getppid() != _PARENT:
        who = "rank 0 (the process that started this one)"
    else:
        who = "another rank"
    if kind == "timeout":
        what = (f"{who} stopped answering: a collective timed out (a rank is frozen, or much slower than the "
                f"others; the ring waits the attention's comm_timeout_s, +variant.comm_timeout_s=<s> on the "
                f"command line, other collectives RingStrategy(timeout=...), 30 min by default)")
    else:
        what = f"lost {who}: its connection closed (the process ended: see its own log for why)"
    return (f"rank {global_rank}: {what}. Training stopped at step {step}; every rank is being stopped. "
            f"Continue from the last checkpoint with the same command + resume=true (and the same hydra.run.dir).")


def stop_local_ranks(launcher, grace_s: float = 5.0) -> None:
    """End the ranks this process started (SIGTERM, then SIGKILL after ``grace_s``): no orphans."""
    procs = [p for p in (getattr(launcher, "procs", None) or []) if p.poll() is None]
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except Exception:  # still running: a rank frozen in a collective ignores SIGTERM
            p.kill()


# ---------------------------------------------------------------------- a rank's own failure
def _failure_dirs(run_dir: str) -> List[str]:
    """Where failures are noted: the run directory, and a per-run folder in the temporary
    directory for when the run directory cannot be written (a full disk)."""
    key = hashlib.blake2b(os.path.abspath(run_dir).encode(), digest_size=6).hexdigest()
    return [os.path.join(run_dir, ".ring_lightning"), os.path.join(tempfile.gettempdir(), f"ring_lightning-{key}")]


def clear_failures(run_dir: str) -> None:
    """Forget the failures of an earlier run in this directory (the launching process, at start)."""
    for folder in _failure_dirs(run_dir):
        for path in glob.glob(os.path.join(folder, "failed-rank*")):
            try:
                os.remove(path)
            except OSError:
                pass


def record_failure(run_dir: str, rank: int, exc: BaseException) -> None:
    """Note that ``rank`` stopped with ``exc`` (its first line), where its peers will look."""
    for folder in _failure_dirs(run_dir):
        try:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, f"failed-rank{rank}"), "w") as f:
                f.write(first_line(exc))
            return
        except OSError:
            continue


def failed_peers(run_dir: str, rank: int, wait_s: float = 0.3) -> List[Tuple[int, str]]:
    """(rank, its error's first line) of the other ranks that noted a failure, waiting up to
    ``wait_s`` for one. A failing rank notes its error before its process group goes, so the note
    is there before our collective breaks; the wait stays short because Lightning's child observer
    ends rank 0 a few seconds after a child fails, and the lost-rank message must come first."""
    deadline = time.monotonic() + wait_s
    while True:
        found = {}
        for folder in _failure_dirs(run_dir):
            for path in glob.glob(os.path.join(folder, "failed-rank*")):
                other = int(path.rsplit("failed-rank", 1)[1]) if path.rsplit("failed-rank", 1)[1].isdigit() else -1
                if other != rank and other not in found:
                    try:
                        with open(path) as f:
                            found[other] = f.read().strip()
                    except OSError:
                        pass
        if found or time.monotonic() >= deadline:
            return sorted(found.items())
        time.sleep(0.1)


def peer_failed_message(rank: int, failed: List[Tuple[int, str]]) -> str:
    # the error's type only: its message is the failing rank's to print, once
    who = ", ".join(f"rank {r} ({line.split(':', 1)[0]})" for r, line in failed)
    return f"rank {rank}: stopping because {who} failed; its own report is above."


def same_error_elsewhere(run_dir: str, rank: int, exc: BaseException, wait_s: float = 1.0) -> Optional[int]:
    """A lower rank that noted this same error (a bug every rank hits): its rank, so this one
    says a line instead of printing the same traceback again; None otherwise."""
    mine = first_line(exc)
    same = [r for r, line in failed_peers(run_dir, rank, wait_s) if line == mine and r < rank]
    return same[0] if same else None
