"""Callbacks that keep a long run trustworthy: non-finite steps, and a last checkpoint at the end.

``NonFiniteGuard`` (``conf/callbacks/default.yaml``: ``non_finite``) watches every optimizer
step of every variant. After backward the gradients are already averaged over all ranks,
so every rank sees the same verdict and acts alike (nothing hangs, nobody trains on
alone). The check stays on the device: a flag is folded into a device tensor each step and
read on the host only every ``check_every_n_steps`` steps, before every checkpoint and at
the end, so it adds no host synchronisation per step (``policy="skip"`` needs the verdict
before the step, so it reads it every step). Policies:

* ``stop`` (default): the run ends with an error naming the first bad step and the ranks
  whose own loss was non-finite there; a checkpoint is never written from such a state,
  so the kept checkpoints are the good ones before it.
* ``skip``: a step with a non-finite gradient is dropped (every gradient set to None, so
  the optimizer changes neither weights nor moments), at most ``max_skips`` times; then
  it stops as above.

``FinalCheckpoint`` writes ``last.ckpt`` when training ends at a step that no periodic
checkpoint saved, so the summary's continue hint resumes from the final step, and when a
SIGTERM (pre-emption) interrupts the run. ``RandomState`` keeps every rank's random
generators in the checkpoint, the data position lives in the training loader's own state
(``ring_lightning.data.resumable``): together a resumed run repeats the uninterrupted one.

``ConfigAgreement`` compares every rank's composed config (a hash per key) before the
first step and stops with the keys that differ: a rank started with another ``module.lr``,
``data.seed`` or ``compression`` would otherwise train apart or hang in a collective.

``AtomicCheckpointIO`` and ``newest_valid_checkpoint`` live in ``checkpoint_io.py`` (re-exported
here: the configs name ``ring_lightning.training.callbacks.AtomicCheckpointIO``).
"""

from __future__ import annotations

import os
import signal
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ring_lightning.training.checkpoint_io import AtomicCheckpointIO, newest_valid_checkpoint, readable  # noqa: F401
from ring_lightning.training.run_log import launch_rank

POLICIES = ("stop", "skip")
#: Run by the second Ctrl-C before ``os._exit`` (which skips atexit): ``app/run_dir.py`` adds the
#: release of the run-directory lock it takes (training imports nothing of the app above it).
HARD_STOP_HOOKS: list = []
_NEVER = 2**62  # "no bad step yet" in the device-side first-bad-step tensors


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient (see NonFiniteGuard)."""


class NonFiniteGuard(pl.Callback):
    def __init__(self, policy: str = "stop", max_skips: int = 10, check_every_n_steps: int = 50) -> None:
        if policy not in POLICIES:
            raise ValueError(f"callbacks.non_finite.policy={policy!r} is not valid; valid values: {POLICIES}")
        if max_skips < 0 or check_every_n_steps < 1:
            raise ValueError("callbacks.non_finite.max_skips must be >= 0 and check_every_n_steps >= 1")
        self.policy, self.max_skips, self.check_every = policy, int(max_skips), int(check_every_n_steps)
        self.skipped = 0
        self._first_bad_grad: Optional[torch.Tensor] = None  # device: first step with a bad gradient
        self._first_bad_loss: Optional[torch.Tensor] = None  # device: first step this rank's loss was bad

    # ------------------------------------------------------------------ per step
    def _flags(self, device) -> None:
        if self._first_bad_grad is None or self._first_bad_grad.device != device:
            self._first_bad_grad = torch.full((), _NEVER, dtype=torch.long, device=device)
            self._first_bad_loss = torch.full((), _NEVER, dtype=torch.long, device=device)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16: the GradScaler skips overflowing steps itself (its gradients are scaled)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        self._flags(pl_module.device)  # not the gradients': offloaded ones (strategy.offload_params) are on the host
        total = torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()  # inf/nan if any gradient is
        if hasattr(total, "full_tensor"):  # sharded gradients (FSDP2): every rank's verdict on the whole norm
            total = total.full_tensor()
        bad = (~torch.isfinite(total)).to(self._first_bad_grad.device)
        step = trainer.global_step
        if self.policy == "skip":
            if bool(bad):  # the verdict is needed before the step: one read per step
                self.skipped += 1
                if self.skipped > self.max_skips:
                    self._first_bad_grad.fill_(step)
                    self._stop(trainer, f"more than max_skips={self.max_skips} steps were skipped")
                for g in optimizer.param_groups:
                    for p in g["params"]:
                        p.grad = None  # AdamW leaves parameters without a gradient untouched
                pl_module.log("train/skipped_steps", float(self.skipped), rank_zero_only=True)
            return
        self._first_bad_grad = torch.where(bad & (self._first_bad_grad == _NEVER),
                                           torch.full_like(self._first_bad_grad, step), self._first_bad_grad)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._flags(loss.device)
            bad = ~torch.isfinite(loss.detach()).all()
            self._first_bad_loss = torch.where(bad & (self._first_bad_loss == _NEVER),
                                               torch.full_like(self._first_bad_loss, trainer.global_step - 1),
                                               self._first_bad_loss)
        if trainer.global_step % self.check_every == 0:
            self.check(trainer)

    # ------------------------------------------------------------------ checks
    def check(self, trainer) -> None:
        """Read the device flags (a host sync); stop if a step went non-finite."""
        if self.policy == "stop" and self._first_bad_grad is not None and int(self._first_bad_grad) != _NEVER:
            self._stop(trainer, "the policy is stop")

    def _stop(self, trainer, why: str) -> None:
        step = int(self._first_bad_grad)
        mine = int(self._first_bad_loss) if self._first_bad_loss is not None else _NEVER
        ranks = trainer.strategy.all_gather(torch.tensor(mine, device=self._first_bad_grad.device))
        ranks = ranks.reshape(-1).tolist() if isinstance(ranks, torch.Tensor) else [mine]
        named = [r for r, s in enumerate(ranks) if s != _NEVER]
        who = (f"the loss was non-finite on rank(s) {named}" if named
               else "the loss was finite on every rank: a gradient overflowed")
        raise NonFiniteError(
            f"non-finite gradient at step {step} ({who}); stopping because {why}. No checkpoint was "
            f"written from it: resume from the last one with a lower module.lr, gradient clipping "
            f"(trainer.gradient_clip_val) or callbacks.non_finite.policy=skip for rare spikes.")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.check(trainer)  # raising here keeps the file from being written
        checkpoint["non_finite_skipped"] = self.skipped

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self.skipped = int(checkpoint.get("non_finite_skipped", 0))

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer)


class FinalCheckpoint(pl.Callback):
    """``last.ckpt`` of the final step: at the end of training, unless the periodic checkpoint
    already saved that step, and when the run is interrupted cleanly (SIGTERM: SLURM
    pre-emption, ``scancel``, ``kill``; SIGINT: Ctrl-C).

    Lightning's ModelCheckpoint writes ``last`` at the end only if it never wrote one, so a
    run ending between intervals left ``last.ckpt`` at an older step. This asks the same
    ModelCheckpoint to save its ``last`` once more, so its bookkeeping (``last_model_path``,
    file names, rank-0 file checks) stays its own. It runs before ModelCheckpoint's own
    ``on_train_end`` (Lightning moves checkpoint callbacks last).

    SIGTERM: Lightning's own handler broadcasts from inside the signal handler, which can meet
    another collective on some rank and hang the job (seen with 4 gloo ranks). This one only
    notes the signal. At the end of every batch, a point every rank reaches in the same order,
    the ranks agree on it (an all-reduce of one flag, beside Lightning's own per-step
    broadcast) and set Lightning's flag together, so Lightning raises ``SIGTERMException`` on
    every rank at the same point, once the batch is logged. ``last.ckpt`` is then written in
    ``on_exception`` (every rank takes part) and the resumed run continues with the next batch.

    Ctrl-C (SIGINT, which a terminal sends to every process of the job) takes the same path:
    the first one finishes the current step, writes ``last.ckpt`` of it on every rank and train.py
    prints the summary with the continue command (exit 130); a second Ctrl-C stops at once,
    without a checkpoint. ``stopped_by`` names the signal the ranks agreed on.
    """

    _CODES = {0: None, int(signal.SIGINT): "SIGINT", int(signal.SIGTERM): "SIGTERM"}

    # A SIGINT within this of the first is the same Ctrl-C delivered again (coreutils `timeout`
    # forwards it to the process and to its group), not a second press.
    REPEAT_S = 0.5

    def __init__(self) -> None:
        self._signal = 0  # the signal noted by this process (SIGTERM wins over SIGINT)
        self._first_sigint: Optional[float] = None  # when the first Ctrl-C arrived (time.monotonic)
        self.stopped_by: Optional[str] = None  # the one every rank agreed on

    def on_train_start(self, trainer, pl_module) -> None:
        if threading_main():  # (Lightning registered its own SIGTERM handler just before)
            signal.signal(signal.SIGTERM, self._note_signal)
            signal.signal(signal.SIGINT, self._note_signal)

    def _note_signal(self, signum, frame) -> None:
        # No collective here: a handler runs between any two bytecodes, maybe inside one.
        import time

        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_sigint is not None and now - self._first_sigint > self.REPEAT_S:
                self._stop_now()
            if self._first_sigint is None:
                self._first_sigint = now
                if launch_rank() == 0:  # os.write: print() may be mid-write on this thread
                    os.write(2, b"\nCtrl-C: finishing this step and writing last.ckpt (Ctrl-C again: stop at once, "
                                b"without it)\n")
        self._signal = max(self._signal, int(signum))

    @staticmethod
    def _stop_now() -> None:
        """The second Ctrl-C: out at once (no checkpoint, no collective), the run-dir lock freed."""
        if launch_rank() == 0:  # os.write, not print: the handler may interrupt a print
            os.write(2, b"\nsecond Ctrl-C: stopping now, without a checkpoint of this step\n")
        for hook in HARD_STOP_HOOKS:
            hook()
        os._exit(128 + int(signal.SIGINT))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        epoch_loop = getattr(trainer.fit_loop, "epoch_loop", None)
        if epoch_loop is not None and epoch_loop._should_accumulate():
            # Mid gradient accumulation: stopping here would checkpoint a data position past
            # micro-batches whose gradients no optimizer step has used. Every rank skips alike.
            return
        flag = torch.tensor([self._signal], device=pl_module.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():  # every rank alike: Lightning raises at the end of this batch (on_advance_end)
            self.stopped_by = self._CODES.get(int(flag.item()), "SIGTERM")
            trainer._signal_connector.received_sigterm = True

    def _save_last(self, trainer) -> None:
        ckpt = trainer.checkpoint_callback
        if ckpt is None or not getattr(ckpt, "save_last", False) or trainer.global_step == 0:
            return
        if getattr(ckpt, "_last_global_step_saved", None) == trainer.global_step:
            return
        ckpt._save_last_checkpoint(trainer, ckpt._monitor_candidates(trainer))

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_last(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save_last(trainer)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if threading_main() and signal.getsignal(signal.SIGINT) == self._note_signal:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # after fit: Ctrl-C as usual


def interrupted_by(trainer) -> str:
    """The signal that interrupted ``trainer`` ("SIGTERM" or "SIGINT"; "SIGTERM" when unknown)."""
    for callback in trainer.callbacks:
        if isinstance(callback, FinalCheckpoint) and callback.stopped_by:
            return callback.stopped_by
    return "SIGTERM"


def threading_main() -> bool:
    """Signal handlers can be set only from the main thread."""
    import threading

    return threading.current_thread() is threading.main_thread()


class RandomState(pl.Callback):
    """Every rank's random generators (torch CPU and CUDA, Python, NumPy) in the checkpoint,
    restored on resume, so dropout and any other sampling continue as if never stopped.

    Saving gathers the states to every rank (all ranks write the checkpoint's contents; rank 0
    writes the file); a resume on another number of ranks keeps the seeded generators.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        mine = _random_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(everyone, mine)
        else:
            everyone = [mine]
        checkpoint["random_states"] = everyone

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        states = checkpoint.get("random_states")
        if states and len(states) == trainer.world_size:
            _set_random_states(states[trainer.global_rank])


def _random_states() -> dict:
    import random

    import numpy as np

    # NumPy's key array as a tensor: checkpoints stay loadable with torch.load(weights_only=True)
    name, key, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_random_states(states: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ConfigAgreement(pl.Callback):
    """Fail at start-up, naming the keys, when the ranks' configs differ.

    ``fingerprint``: key -> hash of its value (``config_fingerprint`` of the composed config);
    train.py builds it, keys that legitimately differ per rank (none by default) left out.
    """

    def __init__(self, fingerprint: dict) -> None:
        self.fingerprint = dict(fingerprint)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        everyone = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, self.fingerprint)
        mine = self.fingerprint
        for rank, theirs in enumerate(everyone):
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if diff:
                raise ValueError(
                    f"rank {torch.distributed.get_rank()} and rank {rank} were started with different configs: "
                    f"{', '.join(diff[:10])}{' ...' if len(diff) > 10 else ''} differ. Every rank must compose "
                    f"the same config: pass the same overrides (and environment) to every process.")


def config_fingerprint(flat: dict) -> dict:
    """key -> a short stable hash of its value (the values themselves may be long or private)."""
    import hashlib

    return {k: hashlib.blake2b(repr(v).encode(), digest_size=8).hexdigest() for k, v in flat.items()}


class FailureRecord(pl.Callback):
    """Notes this rank's own exception for its peers (faults.py: a rank's own failure is not a lost rank).

    Here, not in faults.py: the ring reads backend errors through faults.py, and importing
    Lightning there would add seconds to the first error a ring reports."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = str(run_dir)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from ring_lightning.sequence.faults import peer_failure, record_failure

        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or peer_failure(exception) is not None:
            return  # an interruption, or a peer's failure seen from here: not this rank's own
        record_failure(self.run_dir, trainer.global_rank, exception)
