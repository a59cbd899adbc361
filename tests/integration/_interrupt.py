"""A test-only callback: rank 0 sends itself a real SIGTERM (as SLURM pre-emption or `kill`
would) once training reaches ``step``; train.py is then expected to stop cleanly."""

import os
import signal

import lightning.pytorch as pl


class SigtermAtStep(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step, self.sent = int(step), False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.is_global_zero and trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
