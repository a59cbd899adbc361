"""One run per run directory, and what a run starting there continues from.

``start_run`` (train.py, after the pre-flight, before any rank starts) does, in the launching process:

* **the lock**: ``<run dir>/.ring_lightning/run.lock`` holds the run's identity (pid, host,
  start time, command) while it lives there; a second run in a live directory is refused,
  naming the directory and the owner. A lock whose process is gone (same host: the pid is not
  running, or is another process; another host: no heartbeat for ``STALE_AFTER_S``; the same
  SLURM job, requeued) is taken over with a note. The owner refreshes the lock's time every ``HEARTBEAT_S`` and removes it
  on the way out. With one run at a time, ``metrics.jsonl`` cannot interleave two runs.
* **a fresh run** (no ``resume=true`` / ``ckpt_path``) in a directory that already holds
  checkpoints is refused before launch: the files belong to another run, and a resume would
  have mixed the two (Lightning wrote ``last-v1.ckpt`` beside the old ``last.ckpt``).
* **the resume choice**: the newest checkpoint *by step* that loads (``checkpoint_io``: files and folders of shards alike);
  leftovers of a killed write are cleared by the launching process, the ranks that choose for
  themselves waiting until it has (``wait_for_cleanup``); the config recorded in the checkpoint is compared
  with this one (``resume_compat``); ``metrics.jsonl`` keeps the rows up to the resumed step,
  so the steps replayed after it are not in the file twice.

The choice reaches the ranks Lightning starts through the environment (``ENV_RESUME``);
ranks started by torchrun or SLURM choose alike (the choice is deterministic).
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

LOCK_DIR, LOCK_NAME = ".ring_lightning", "run.lock"
HEARTBEAT_S, STALE_AFTER_S = 30.0, 180.0
ENV_RESUME = "RING_LIGHTNING_RESUME"  # "<resume path>|<weights path>" decided by the launching process
METRICS_NAME = "metrics.jsonl"
#: How long a rank that chooses for itself waits for rank 0 to clear leftovers (a folder's removal
#: can take a while on a network filesystem), and how often it looks.
CLEANUP_WAIT_S, CLEANUP_POLL_S = 600.0, 0.2

_OWNED: Dict[str, Any] = {}  # the lock this process holds: {"path", "token", "stop"}


def lock_path(run_dir: str) -> str:
    return os.path.join(run_dir, LOCK_DIR, LOCK_NAME)


def _proc_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def identity(command: Optional[str] = None) -> Dict[str, Any]:
    """This run: pid, host, start time (and the pid's start ticks), the command line."""
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "proc_start": _proc_start(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command or " ".join(sys.argv),
            "slurm_job": os.environ.get("SLURM_JOB_ID"), "token": f"{socket.gethostname()}:{pid}:{time.time_ns()}"}


def owner_alive(owner: Dict[str, Any], path: str) -> bool:
    """Is the run that wrote this lock still running?"""
    if owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid", -1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # someone else's process: alive
        start = _proc_start(pid)
        return owner.get("proc_start") is None or start is None or start == owner["proc_start"]
    try:
        return time.time() - os.path.getmtime(path) < STALE_AFTER_S  # another host: its heartbeat
    except OSError:
        return False


def describe(owner: Dict[str, Any]) -> str:
    return (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
            f"{owner.get('command', '?')}")


def acquire(run_dir: str, command: Optional[str] = None) -> List[str]:
    """Take the run directory's lock for this process; returns notes (a stale lock taken over).

    Raises:
        ConfigError: another live run owns the directory.
    """
    from ring_lightning.preflight import ConfigError

    path = lock_path(run_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    me, notes = identity(command), []
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    owner = json.load(f)
            except (OSError, ValueError):
                owner = {}
            if owner.get("pid") == me["pid"] and owner.get("host") == me["host"]:
                pass  # this process's own (a sweep job before): take it again
            elif owner.get("slurm_job") and owner.get("slurm_job") == me["slurm_job"]:
                notes.append(f"note: {path} was left by this SLURM job before it was requeued; taking it over")
            elif owner and owner_alive(owner, path):
                raise ConfigError(
                    f"hydra.run.dir={run_dir} belongs to a run that is still running ({describe(owner)}). "
                    f"One run per directory: wait for it or stop it, or start this one in another "
                    f"hydra.run.dir. (If that run is gone, delete {path}.)") from None
            else:
                notes.append(f"note: {path} was left by a run that is gone ({describe(owner) if owner else 'unreadable'}); "
                             f"this run takes the directory over")
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _own(path, me["token"])
        return notes
    raise ConfigError(f"hydra.run.dir={run_dir}: another run took {path} at the same moment; start this one "
                      f"in another hydra.run.dir")


def _own(path: str, token: str) -> None:
    release_owned_lock()
    stop = threading.Event()

    def heartbeat() -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except OSError:
                return

    threading.Thread(target=heartbeat, name="run-dir-lock", daemon=True).start()
    _OWNED.update(path=path, token=token, stop=stop)
    from ring_lightning.training.callbacks import HARD_STOP_HOOKS  # a second Ctrl-C exits without atexit

    if release_owned_lock not in HARD_STOP_HOOKS:
        HARD_STOP_HOOKS.append(release_owned_lock)


def release_owned_lock() -> None:
    """Remove the lock this process holds (if it is still ours). Safe in a signal handler."""
    if not _OWNED:
        return
    path, token, stop = _OWNED.pop("path"), _OWNED.pop("token"), _OWNED.pop("stop")
    stop.set()
    try:
        with open(path) as f:
            if json.load(f).get("token") == token:
                os.remove(path)
    except (OSError, ValueError):
        pass


atexit.register(release_owned_lock)


# ---------------------------------------------------------------------- what a run continues from
@dataclass
class RunStart:
    """What ``trainer.fit`` starts from: ``ckpt_path`` (a full resume), ``weights_from`` (the
    weights alone, ``resume_weights_only``), and the notes to print."""

    ckpt_path: Optional[str] = None
    weights_from: Optional[str] = None
    step: Optional[int] = None
    notes: List[str] = field(default_factory=list)


def refuse_fresh_run_over_checkpoints(ckpt_dir: str, run_dir: str) -> None:
    """A new run must not write beside another run's checkpoints (see the module docstring)."""
    from ring_lightning.training.checkpoint_io import newest_checkpoint
    from ring_lightning.preflight import ConfigError

    if not ckpt_dir or not os.path.isdir(ckpt_dir):
        return
    path, step, damaged = newest_checkpoint(ckpt_dir)
    if path is None and not damaged:
        return
    held = f"up to step {step} ({path})" if path else f"{len(damaged)} file(s) that do not load"
    raise ConfigError(
        f"hydra.run.dir={run_dir} already holds the checkpoints of another run, {held}. Continue that run "
        f"with the same command + resume=true, or start this one in another hydra.run.dir (or move "
        f"{ckpt_dir} away first).")


def wait_for_cleanup(ckpt_dir: str) -> None:
    """A rank that chooses for itself (started by torchrun or SLURM) waits until the launching
    process (global rank 0) has cleared the leftovers of killed writes: clearing them may give a
    checkpoint its name back (``clean_folder_leftovers``), and a rank choosing before that would
    resume from another step. One process clears, on the filesystem every rank shares.

    Raises:
        ConfigError: leftovers still there after ``CLEANUP_WAIT_S``.
    """
    from ring_lightning.training.checkpoint_io import leftovers
    from ring_lightning.preflight import ConfigError

    deadline = time.monotonic() + CLEANUP_WAIT_S
    while leftovers(ckpt_dir):
        if time.monotonic() > deadline:
            raise ConfigError(
                f"{ckpt_dir} still holds leftovers of a killed checkpoint write ({', '.join(leftovers(ckpt_dir))}) "
                f"after {CLEANUP_WAIT_S:.0f} s: rank 0 clears them before the ranks choose what to resume, on a "
                f"filesystem every node shares (callbacks.model_checkpoint.dirpath); remove them by hand if "
                f"rank 0 cannot")
        time.sleep(CLEANUP_POLL_S)


def choose(cfg, ckpt_dir: Optional[str], quiet: bool = False) -> RunStart:
    """The checkpoint to continue from (see the module docstring); notes unless ``quiet``."""
    from ring_lightning.training.checkpoint_io import checkpoint_step, clean_leftovers, newest_checkpoint
    from ring_lightning.preflight import ConfigError

    start = RunStart()
    if ckpt_dir and os.path.isdir(ckpt_dir) and not quiet:
        start.notes += [f"note: cleared {p}, the leftover of a checkpoint write that was killed"
                        for p in clean_leftovers(ckpt_dir)]
    elif ckpt_dir and os.path.isdir(ckpt_dir):
        wait_for_cleanup(ckpt_dir)
    if cfg.get("ckpt_path"):
        path = os.path.expanduser(str(cfg.ckpt_path))
        step = checkpoint_step(path)
        if step is None:
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not load as a checkpoint (missing, damaged, not "
                              f"written by Lightning, or a folder of shards whose save was cut short); point "
                              f"ckpt_path at a checkpoint (.ckpt file or folder) that does")
        start.ckpt_path, start.step = path, step
    elif cfg.get("resume"):
        path, step, damaged = newest_checkpoint(ckpt_dir) if ckpt_dir else (None, None, [])
        if path is None and damaged:
            # Checkpoints are there but none loads: starting from 0 would silently drop the run.
            raise ConfigError(
                f"resume=true: no checkpoint in {ckpt_dir} loads ({', '.join(map(os.path.basename, damaged))}: "
                f"damaged, or holding objects a weights_only load refuses); point ckpt_path=<file> at one that "
                f"loads, or start a new run in another hydra.run.dir")
        start.notes += [f"resume=true: {p} is damaged (not a complete checkpoint); skipping it" for p in damaged]
        if path is None:
            start.notes.append(f"resume=true: no checkpoint to resume in {ckpt_dir}; starting from step 0 (point "
                               f"hydra.run.dir at the run to continue)")
        start.ckpt_path, start.step = path, step
    if start.ckpt_path and cfg.get("resume_weights_only"):
        start.weights_from, start.ckpt_path = start.ckpt_path, None
        start.notes.append(f"resume_weights_only=true: the weights of {start.weights_from} (step {start.step}); "
                           f"a fresh optimizer and LR schedule, from step 0")
    return start


def set_aside_newer(ckpt_dir: Optional[str], chosen: str, step: Optional[int]) -> List[str]:
    """A rollback (``ckpt_path`` at an older checkpoint of this run dir): the checkpoints of later
    steps move to ``checkpoints/abandoned-<time>/``, or a later ``resume=true`` (newest by step)
    would jump forward to the abandoned branch."""
    from ring_lightning.training.checkpoint_io import checkpoint_step

    if not ckpt_dir or step is None or not os.path.isdir(ckpt_dir) \
            or os.path.dirname(os.path.abspath(chosen)) != os.path.abspath(ckpt_dir):
        return []
    newer = [p for p in sorted(glob.glob(os.path.join(ckpt_dir, "*.ckpt")))
             if os.path.abspath(p) != os.path.abspath(chosen) and (checkpoint_step(p) or 0) > step]
    if not newer:
        return []
    aside = os.path.join(ckpt_dir, f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(aside, exist_ok=True)
    for p in newer:
        shutil.move(p, os.path.join(aside, os.path.basename(p)))
    return [f"note: continuing from step {step}: {len(newer)} checkpoint(s) of later steps moved to {aside}"]


def trim_metrics(run_dir: str, step: Optional[int]) -> Optional[str]:
    """``metrics.jsonl`` as of ``step``: rows logged after it go (the resumed run logs them again);
    a fresh run (``step`` None) moves an earlier file aside. Returns a note, or None."""
    path = os.path.join(run_dir, METRICS_NAME)
    if not os.path.isfile(path):
        return None
    if step is None:
        aside = os.path.join(run_dir, f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
        shutil.move(path, aside)
        return f"note: {path} of an earlier run (no checkpoint) moved to {aside}"
    with open(path) as f:
        rows = [line for line in f if line.strip()]

    def step_of(line: str) -> float:
        try:
            return json.loads(line).get("step") or 0
        except ValueError:  # a row cut short by a kill or a full disk: dropped, logged again
            return float("inf")

    # A row's `step` is the optimizer steps done when it was logged (run_report.StepMetric): rows
    # up to the checkpoint's step belong to it, later ones are logged again by the resumed run.
    kept = [line for line in rows if step_of(line) <= step]
    if len(kept) == len(rows):
        return None
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
    return f"note: {path}: {len(rows) - len(kept)} row(s) logged after step {step} dropped (logged again now)"


def start_run(cfg, flat: Dict[str, Any], launching: bool) -> RunStart:
    """The lock, the fresh-run check, the resume choice and its config check (module docstring).

    Raises:
        ConfigError: a live run owns the directory; a fresh run over checkpoints; a resume whose
            config changed a key that cannot change; a ``ckpt_path`` that does not load.
    """
    from ring_lightning.app import resume_compat

    run_dir = str(cfg.paths.output_dir)
    ckpt_dir = ((cfg.get("callbacks") or {}).get("model_checkpoint") or {}).get("dirpath")
    decided = os.environ.get(ENV_RESUME)
    if not launching and decided is not None:  # a rank Lightning started: the launcher decided
        ckpt, weights = (p or None for p in decided.split("|", 1))
        return RunStart(ckpt_path=ckpt, weights_from=weights)
    notes = acquire(run_dir) if launching else []
    if cfg.get("resume") and cfg.get("resume_weights_only"):
        from ring_lightning.preflight import ConfigError

        raise ConfigError("resume=true continues this run dir's own run; resume_weights_only=true starts a new "
                          "one from another run's weights: use hydra.run.dir=<new dir> ckpt_path=<file> "
                          "resume_weights_only=true (without resume=true)")
    continuing = bool(cfg.get("ckpt_path")) or bool(cfg.get("resume"))
    if not continuing:
        refuse_fresh_run_over_checkpoints(ckpt_dir, run_dir)
    start = choose(cfg, ckpt_dir, quiet=not launching)
    start.notes = notes + start.notes
    if launching and cfg.get("ckpt_path") and start.ckpt_path and not cfg.get("resume_weights_only"):
        start.notes += set_aside_newer(ckpt_dir, start.ckpt_path, start.step)
    chosen = start.ckpt_path or start.weights_from
    if chosen:
        start.notes += resume_compat.check_resume(chosen, flat, weights_only=bool(cfg.get("resume_weights_only")))
    if launching:
        note = trim_metrics(run_dir, start.step if start.ckpt_path else None)
        start.notes += [note] if note else []
        os.environ[ENV_RESUME] = f"{start.ckpt_path or ''}|{start.weights_from or ''}"
    return start
