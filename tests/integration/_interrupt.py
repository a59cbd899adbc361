"""A test-only callback: rank 0 sends itself a real SIGTERM (as SLURM pre-emption or `kill`
would) once training reaches ``step``; train.py is then expected to stop cleanly."""

import os
import signal

import lightning.pytorch as pl


class SigtermAtStep(pl.Callback):
    """Rank 0 sends itself a real SIGTERM (as SLURM pre-emption or `kill` would) during the
    batch that ends at ``step``; train.py is then expected to stop cleanly after it."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = int(step), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.is_global_zero and trainer.global_step == self.step - 1 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


class KillRankAtStep(pl.Callback):
    """Rank ``rank`` dies without a word (SIGKILL: out of memory, a lost node) at ``step``."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = int(step), int(rank)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class FreezeRankAtStep(pl.Callback):
    """Rank ``rank`` stops taking part (a hung kernel, a deadlock) at ``step``: it sleeps."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = int(step), int(rank)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            import time

            time.sleep(3600)


class CtrlCAtStep(pl.Callback):
    """Rank 0 sends SIGINT to the whole process group during the batch that ends at ``step``, as a
    terminal's Ctrl-C reaches every process of the job (the ranks Lightning started included)."""

    def __init__(self, step: int) -> None:
        self.step, self.sent = int(step), False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.is_global_zero and trainer.global_step == self.step - 1 and not self.sent:
            self.sent = True
            os.killpg(os.getpgid(0), signal.SIGINT)


class DiskFullAtStep(pl.Callback):
    """From ``step`` on, every checkpoint write on rank 0 fails as on a full disk (ENOSPC), after
    part of the file was written."""

    def __init__(self, step: int) -> None:
        self.step = int(step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import errno

        import torch

        if not trainer.is_global_zero or trainer.global_step != self.step - 1 or getattr(torch.save, "full", False):
            return
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if ".ckpt.tmp-" in str(getattr(f, "name", "")):
                f.write(b"x" * 4096)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)

        save.full = True
        torch.save = save
