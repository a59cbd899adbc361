"""Pictures of a run: every logged value in ``<run dir>/metrics.jsonl``, and at the end a PNG.

``MetricsFile`` is a Lightning logger (``train.py`` adds it to every run, beside wandb or
CSV): rank 0 appends one JSON line per logging call, ``{"step": s, "<name>": value, ...}``,
exactly the values Lightning hands every logger; at the end of fit ``plot_metrics`` draws
``metrics.png``: loss (train and validation), throughput (tokens/s) and peak memory per rank.
``final_metrics`` reads a file back (last value of each name), which the sweep table uses.

Steps are counted one way everywhere: the number of optimizer steps done. ``StepMetric``
(train.py adds it to every run) logs ``step`` = ``trainer.global_step`` with the training and
validation metrics, which Lightning then hands every logger (wandb, CSV, this file) as the
step, instead of its 0-based logging counter; the progress lines and the summary count the
same way, and ``MetricsFile.record_final_step`` writes the last step when it was not logged.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Mapping, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "metrics.png"
# The panels of the PNG: (title, y label, metric names drawn in it; a trailing * is a prefix)
PANELS = (
    ("loss", "cross-entropy (nats/token)", ("train/loss", "val/loss")),
    ("throughput", "tokens / s (all ranks)", ("perf/tokens_per_s",)),
    ("memory", "peak MiB per rank (CUDA alloc. / CPU RSS)", ("perf/peak_memory_mb_rank*",)),
)


class MetricsFile(Logger):
    """Every logged metric as JSON lines in ``<save_dir>/metrics.jsonl``; ``metrics.png`` at the end.

    Args:
        save_dir: the run directory (train.py: ``paths.output_dir``).
        plot: draw ``metrics.png`` when fit ends.
    """

    def __init__(self, save_dir: str, plot: bool = True) -> None:
        super().__init__()
        self._save_dir, self.plot = str(save_dir), bool(plot)
        self.path = os.path.join(self._save_dir, METRICS_FILE)
        self.plot_path = os.path.join(self._save_dir, PLOT_FILE)

    @property
    def name(self) -> str:
        return "metrics_file"

    @property
    def version(self) -> Optional[str]:
        return None

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass  # the composed config is in .hydra/config.yaml next to this file

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        os.makedirs(self._save_dir, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    @rank_zero_only
    def record_final_step(self, step: int) -> None:
        """Append ``{"step": step}`` when the last row is of an earlier step (the last steps
        fell between two logging steps), so ``final_metrics`` reads the steps done."""
        if step > 0 and os.path.isfile(self.path) and final_metrics(self.path).get("step") != step:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step}) + "\n")

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if status == "failed":
            # A failed run (a lost rank, an error) must report first: Lightning's child observer
            # ends rank 0 seconds after a child dies, and drawing takes seconds on a loaded host.
            # metrics.jsonl holds every value; run_report.plot_metrics draws it afterwards.
            return
        if self.plot and os.path.isfile(self.path):
            run = os.path.join(*os.path.normpath(os.path.abspath(self._save_dir)).split(os.sep)[-2:])
            try:
                plot_metrics(self.path, self.plot_path, title=f"{run} ({status})")
            except OSError as exc:  # a full disk is reported once, by whoever hit it first
                print(f"note: {self.plot_path} not drawn ({exc.strerror or exc})", flush=True)


class StepMetric(Callback):
    """Logs ``step`` = optimizer steps done (``trainer.global_step``) with every training step and
    validation, so every logger's x axis is the count the progress lines and summaries use."""

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        pl_module.log("step", float(trainer.global_step))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:  # the same on every rank: the "sync" is a max of equals
            pl_module.log("step", float(trainer.global_step), sync_dist=True, reduce_fx="max")


def read_metrics(path: str) -> List[Dict[str, float]]:
    """The rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def final_metrics(path: str) -> Dict[str, float]:
    """The last logged value of every name in a metrics.jsonl file (and the last step)."""
    out: Dict[str, float] = {}
    for row in read_metrics(path):
        out.update({k: v for k, v in row.items() if v is not None})
    return out


def _series(rows, name: str) -> Dict[str, tuple]:
    """{metric name: (steps, values)} for a name or a ``prefix*``."""
    names = sorted({k for r in rows for k in r if (k.startswith(name[:-1]) if name.endswith("*") else k == name)})
    out = {}
    for n in names:
        pts = [(r["step"], r[n]) for r in rows if n in r and r.get("step") is not None and math.isfinite(r[n])]
        if pts:
            out[n] = tuple(zip(*pts))
    return out


def plot_metrics(path: str, png: str, title: str = "") -> str:
    """Draw loss, throughput and memory from a metrics.jsonl file into ``png``; returns ``png``."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    rows = read_metrics(path)
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    for ax, (panel, ylabel, names) in zip(fig.subplots(1, len(PANELS)), PANELS):
        drawn = {}
        for name in names:
            drawn.update(_series(rows, name))
        if not drawn and panel == "memory":  # one rank: no per-rank series, the max is the value
            drawn = _series(rows, "perf/peak_memory_mb")
        for n, (steps, values) in drawn.items():
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=3, label=n)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.savefig(png, dpi=100)
    return png
