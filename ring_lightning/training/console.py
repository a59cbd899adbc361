"""What a run prints: the project's own warnings and progress, not third-party noise.

* ``quiet_third_party()`` (train.py and examples/quickstart.py call it first): deprecation
  and future warnings raised inside other packages (torch, Lightning, wandb: nothing a user
  of this project can act on), Lightning's "Tip" advertisements and its advice to set
  ``torch.set_float32_matmul_precision`` (runs train in bf16-mixed, where it does not apply),
  and the progress bars of Hugging Face ``datasets`` (the corpus is packed once) are dropped;
  warnings of ``ring_lightning`` itself and every UserWarning stay.
* ``is_noise(text)``: wandb's messages about what Lightning's WandbLogger passes it
  (``wandb.require('service')``, a ``resume`` that offline mode ignores) and its offline
  header (the run's summary names the same run dir and commands), which the run's log tee
  (run_log.py) drops from the console and the log file.
* ``progress_bar()`` (conf/callbacks/default.yaml): tqdm's bar on a terminal; in redirected
  output (a log file, CI, a pipe) one plain line every ``every_n_steps`` steps instead of
  carriage returns and cursor-movement codes.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar

_TIP_PREFIX = "💡 Tip"
_LIGHTNING_ADVICE = ("set_float32_matmul_precision",)
# wandb's own words about what Lightning's WandbLogger passes it: nothing a user can act on
# and its offline header, which the run's summary replaces (it names the run dir, `wandb leet` and `wandb sync`)
_NOISE = ("`wandb.require('service')` is a no-op", "will be ignored since W&B syncing is set to",
          "W&B syncing is set to `offline`", "wandb: Run data is saved locally in", "wandb: View this run in the terminal")


def is_noise(text: str) -> bool:
    """A third-party message with nothing for the user to act on (wandb on Lightning's calls)."""
    return any(n in text for n in _NOISE)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        return not (message.startswith(_TIP_PREFIX) or any(a in message for a in _LIGHTNING_ADVICE))


def quiet_third_party() -> None:
    """Filter third-party deprecation noise and Lightning's tips (this process; ranks that
    Lightning starts re-run train.py, which calls this again)."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when datasets is imported
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
        # ...unless ring_lightning raised it: a project warning is for the user
        warnings.filterwarnings("default", category=category, module=r"ring_lightning(\.|$)")
    # LongDocumentLM restarts RoPE positions in on_before_batch_transfer on purpose (module.py)
    warnings.filterwarnings("ignore", message=r"You have overridden `on_before_batch_transfer`")
    import lightning_utilities.core.rank_zero as rank_zero  # Lightning logs its tips through this logger

    for log in {rank_zero.log, logging.getLogger("lightning.pytorch"), logging.getLogger("lightning.fabric")}:
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())


def quiet_wandb(logger: Any) -> Any:
    """A WandbLogger without the deprecation warning Lightning's own arguments cause: it always
    passes ``anonymous`` to ``wandb.init`` (None when unset), which wandb >= 0.19 warns about,
    and ``resume="allow"``, which an offline run cannot honour (wandb warns on every run)."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous") is None:
        init.pop("anonymous", None)
    # offline, wandb cannot resume a run and says so on every run: do not ask it to
    if isinstance(init, dict) and (getattr(logger, "_offline", False) or os.environ.get("WANDB_MODE") == "offline"):
        init.pop("resume", None)
    return logger


def is_terminal() -> bool:
    """Is the progress going to a terminal (tqdm writes to stderr)?"""
    return sys.stderr.isatty()


class LineProgressBar(ProgressBar):
    """One plain line per ``every_n_steps`` training steps, and one per validation (rank 0)."""

    def __init__(self, every_n_steps: int = 10) -> None:
        super().__init__()
        self.every_n_steps, self._enabled = max(1, int(every_n_steps)), True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _line(self, trainer, pl_module, head: str, keep) -> None:
        if not (self._enabled and trainer.is_global_zero):
            return
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if keep(k)}
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"{head}  {shown}".rstrip(), flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        step, last = trainer.global_step, trainer.max_steps
        if step % self.every_n_steps == 0 or step == last or step == 1:
            self._line(trainer, pl_module, f"step {step}/{last if last and last > 0 else '?'}",
                       lambda k: k != "v_num" and not k.startswith("val/"))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._line(trainer, pl_module, f"validation at step {trainer.global_step}", lambda k: k.startswith("val/"))


def progress_bar(refresh_rate: int = 1, every_n_steps: int = 10) -> ProgressBar:
    """tqdm on a terminal, else :class:`LineProgressBar` (no control codes in a log file)."""
    return TQDMProgressBar(refresh_rate=refresh_rate) if is_terminal() else LineProgressBar(every_n_steps)
