"""What a finished or interrupted run prints: where everything went, how to continue it."""

import os
import sys

from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import WandbLogger

from ring_lightning.app.run_report import MetricsFile


def continue_command(cfg, step: int) -> str:
    """The command that continues this run (a sweep's job too: its own overrides, not the sweep's):
    the run dir, resume=true, and trainer.max_steps to the planned end, or twice the steps done."""
    import shlex

    if not HydraConfig.initialized():  # train(cfg) called in-process: no command line to repeat
        return " ".join(shlex.quote(w) for w in ["python", "train.py", f"hydra.run.dir={cfg.paths.output_dir}",
                                                  "resume=true", f"trainer.max_steps={2 * max(step, 1)}"])
    hydra_cfg = HydraConfig.get()
    replaced = ("hydra.run.dir=", "hydra.sweep.dir=", "resume=", "trainer.max_steps=", "ckpt_path=")
    words = [o for o in hydra_cfg.overrides.hydra if o.startswith("hydra.searchpath=")]  # e.g. a module of your own
    words += [o for o in hydra_cfg.overrides.task if not o.lstrip("+~").startswith(replaced)]
    # `-cd <dir>` is the source Hydra calls "command-line"; without it the decorator's conf/ ("main")
    sources = {s.provider: s for s in hydra_cfg.runtime.config_sources if s.schema == "file"}
    chosen = sources.get("command-line") or sources.get("main")
    config_dir = os.path.relpath(chosen.path) if chosen is not None else "conf"
    head = ["python", os.path.relpath(sys.argv[0]) if sys.argv[0].endswith(".py") else "train.py"]
    if config_dir != "conf" or hydra_cfg.job.config_name != "config":
        head += ["-cd", config_dir, "-cn", hydra_cfg.job.config_name]
    planned = int(cfg.trainer.max_steps or 0)
    target = planned if step < planned else 2 * max(step, 1)  # stopped early: its own end; else as many again
    words += [f"hydra.run.dir={cfg.paths.output_dir}", "resume=true", f"trainer.max_steps={target}"]
    return " ".join(shlex.quote(w) for w in head + words)


def summarize(cfg, trainer, loggers, metrics, ckpt_path) -> str:
    """Where the outputs, checkpoints and logs went, the steps done and the final losses."""
    # Under spawn (sweeps) the main process's trainer does not count the steps; the logged
    # `step` (run_report.StepMetric: optimizer steps done) does.
    step = trainer.global_step or int(metrics.get("step", 0))
    for lg in loggers:
        if isinstance(lg, MetricsFile):
            lg.record_final_step(step)
    ckpt_dir = ((cfg.get("callbacks") or {}).get("model_checkpoint") or {}).get("dirpath")
    lines = [f"outputs      {cfg.paths.output_dir}",
             f"checkpoints  {ckpt_dir}" if ckpt_dir else "checkpoints  none (callbacks.model_checkpoint=null)"]
    if ckpt_dir:  # nothing to continue from without checkpoints
        lines.append(f"continue     {continue_command(cfg, step)}")
    if ckpt_path:
        lines.append(f"resumed from {ckpt_path}")
    for lg in loggers:
        if isinstance(lg, MetricsFile):
            lines.append(f"metrics      {lg.path}  (every logged value, JSON lines)")
            if os.path.isfile(lg.plot_path):
                lines.append(f"plot         {lg.plot_path}  (loss, tokens/s, peak memory)")
        elif isinstance(lg, WandbLogger):
            run_dir = os.path.dirname(lg.experiment.dir)  # .../wandb/offline-run-<time>-<id>
            if lg.experiment.offline:
                lines += [f"wandb        {run_dir}  (offline)",
                          f"             view: wandb leet {run_dir}",
                          f"             upload: wandb sync {run_dir}"]
            else:
                lines.append(f"wandb        {run_dir}  (online)")
        elif getattr(lg, "log_dir", None):
            lines.append(f"{type(lg).__name__:<12} {lg.log_dir}")
    shown = [k for k in ("train/loss", "train/group_loss", "val/loss", "val/ppl", "val/retrieval_acc") if k in metrics]
    lines.append("final        " + "  ".join([f"step {step}"] + [f"{k} {metrics[k]:.4f}" for k in shown]))
    return "\n== ring_lightning run finished ==\n" + "\n".join(lines)
