"""Train a long-document LM with ring attention: the Hydra entry point (configs in conf/).

    python train.py                                   # default: 2 CPU processes (or every GPU),
                                                      # sequence_parallel_size 2, tiny model, stdlib text
    python train.py variant=hilbert compression=topk  # any group option, any field
    python train.py checkpointing=full model=small trainer.max_steps=300
    python train.py -m variant=standard,hilbert       # a sweep (ranks spawned: launch_start_method)
    python train.py -cd recipes -cn retrieval         # a recipe (recipes/README.md)
    python train.py hydra.run.dir=outputs/run1        # a fixed run dir (one run at a time); add
                                                      # resume=true to continue from its newest checkpoint
    python train.py ckpt_path=path/to/last.ckpt       # continue from any checkpoint
    python train.py hydra.run.dir=outputs/new ckpt_path=old/last.ckpt resume_weights_only=true
                                                      # its weights only (another variant, seed, ...)
    torchrun --nproc_per_node=8 train.py hydra.run.dir=outputs/run1   # ranks started by torchrun
    python train.py -cd recipes -cn slurm_multinode -m hydra/launcher=slurm   # SLURM (submitit)

Outputs go to hydra's run dir (outputs/<date>/<time>, or multirun/... under -m):
metrics.jsonl and metrics.png (every logged value; loss, tokens/s, memory), checkpoints/, the
offline wandb run (view it with `wandb leet <dir>`, upload it with `wandb sync <dir>`), the
composed config; a sweep adds sweep_summary.md/.csv/.png to its multirun dir.
Under torchrun every rank composes its own config: fix hydra.run.dir so they agree.
"""

import os
import sys

from ring_lightning.console import quiet_third_party, quiet_wandb

quiet_third_party()  # before the imports that warn; ranks Lightning starts re-run this file

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ring_lightning import preflight, run_dir, run_log
from ring_lightning.callbacks import ConfigAgreement, FailureRecord, config_fingerprint, interrupted_by
from ring_lightning.checkpoint_io import CheckpointWriteError
from ring_lightning.faults import (clear_failures, failed_peers, first_line, lost_rank_message,
                                   peer_failed_message, peer_failure, same_error_elsewhere, stop_local_ranks)
from ring_lightning.hydra_presets import register_model_presets
from ring_lightning.resume_compat import ConfigRecord, load_weights
from ring_lightning.run_report import MetricsFile, StepMetric

CUDA_AVAILABLE = CUDAAccelerator.is_available()  # fork-safe: does not initialise CUDA
# ${if_cuda:a,b} is a when CUDA is available, else b: conf/trainer/default.yaml uses it so the
# defaults take every GPU when there are GPUs and 2 CPU processes otherwise.
OmegaConf.register_new_resolver("if_cuda", lambda a, b: a if CUDA_AVAILABLE else b, replace=True)
register_model_presets()  # the `model` group: ring_lightning.model.PRESETS, no YAML copies


def launch_start_method(cfg: DictConfig) -> str:
    """How Lightning starts the ranks. Its default ("popen") re-runs this script with the
    same command line; under `-m` that command line is the whole sweep, so every job would
    re-launch it. There the ranks are spawned instead, unless SLURM or torchrun already
    started one process per rank (then Lightning launches nothing)."""
    external = SLURMEnvironment.detect() or TorchElasticEnvironment.detect()
    if HydraConfig.get().mode == RunMode.MULTIRUN and not external:
        return "spawn"
    return cfg.strategy.get("start_method", "popen")


def flat_config(cfg: DictConfig) -> dict:
    """The composed config as {"group.key": value}, without the per-run output paths."""
    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from walk(value, name + ".")
            else:
                yield name, value

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("paths", None)
    return dict(walk(plain, ""))


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    # What this rank prints also goes to <run dir>/train.log (rank k: train_ddp_process_<k>.log)
    job = HydraConfig.get().job.name
    rank = run_log.launch_rank()
    run_log.start(run_log.log_path(cfg.paths.output_dir, job, rank), rank)
    pl.seed_everything(cfg.seed, workers=True)  # the model's initial weights depend on it
    # Pre-flight (ring_lightning/preflight.py): every user error is reported here, once, before
    # any process, process group or logger exists.
    with preflight.user_errors(cfg, "data"):
        datamodule = instantiate(cfg.data)
        notes = preflight.check_vocab_size(cfg, datamodule)  # before the model: its size may follow the tokenizer
    with preflight.user_errors(cfg):
        notes += preflight.check_config(cfg)
        preflight.check_data_source(datamodule)
    with preflight.user_errors(cfg, "module"):
        module = instantiate(cfg.module, _convert_="all")
    with preflight.user_errors(cfg, "strategy"):
        strategy = instantiate(cfg.strategy, start_method=launch_start_method(cfg))
    # One run per run dir, and what it continues from (run_dir.py, resume_compat.py): the newest
    # checkpoint by step, its recorded config classed against this one before any weight loads.
    launching = preflight.is_launching_process()
    with preflight.user_errors(cfg):
        start = run_dir.start_run(cfg, flat_config(cfg), launching)
        if start.weights_from:
            load_weights(module, start.weights_from)
    if launching:
        clear_failures(cfg.paths.output_dir)
        notes = notes + start.notes
        print("\n".join(notes), flush=True) if notes else None
    loggers = [quiet_wandb(instantiate(c)) for c in (cfg.logger or {}).values() if c is not None]
    if cfg.get("metrics_file"):
        loggers.append(instantiate(cfg.metrics_file))  # last: wandb / CSV stay the trainer's logger
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks += [ConfigAgreement(config_fingerprint(flat_config(cfg))), ConfigRecord(flat_config(cfg)),
                  FailureRecord(cfg.paths.output_dir), StepMetric(), run_log.RunLog(cfg.paths.output_dir, job)]
    trainer = instantiate(cfg.trainer, strategy=strategy, logger=loggers or False, callbacks=callbacks)

    ckpt_path = start.ckpt_path
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        # Pre-emption (SLURM, scancel, kill) or Ctrl-C: FinalCheckpoint saved last.ckpt of this step.
        signame = interrupted_by(trainer)
        if trainer.is_global_zero:
            ckpt, step = trainer.checkpoint_callback, trainer.global_step
            held = (f"{ckpt.last_model_path} holds it" if ckpt is not None and step > 0
                    and getattr(ckpt, "_last_global_step_saved", None) == step and ckpt.last_model_path
                    else "no checkpoint holds this step (none finished, or callbacks.model_checkpoint.save_last "
                         "is off): resume=true takes the newest checkpoint there is")
            how = "SIGINT (Ctrl-C)" if signame == "SIGINT" else signame
            print(f"\n== ring_lightning run interrupted by {how} at step {step} ==\n"
                  f"checkpoints  {held}\n"
                  f"continue     {continue_command(cfg, step)}", flush=True)
        raise SystemExit(128 + (2 if signame == "SIGINT" else 15))  # the conventional status of the signal
    except Exception as exc:
        write_error = next((e for e in _chain(exc) if isinstance(e, CheckpointWriteError)), None)
        if write_error is not None and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"\nring_lightning: {write_error.strerror}", file=sys.stderr, flush=True)  # once: rank 0 writes
            raise SystemExit(1) from None
        kind = peer_failure(exc)
        if kind is None:  # this rank's own error: reported as itself (FailureRecord tells the peers), once
            first = same_error_elsewhere(cfg.paths.output_dir, trainer.global_rank, exc) if trainer.global_rank else None
            if first is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"rank {trainer.global_rank}: stopped by the same error as rank {first} (reported there)", flush=True)
            raise SystemExit(1) from None
        failed = failed_peers(cfg.paths.output_dir, trainer.global_rank)
        if failed:  # a peer stopped with its own error, reported there: one line, no lost-rank story
            print(peer_failed_message(trainer.global_rank, failed), flush=True)
            stop_local_ranks(trainer.strategy.launcher)
            raise SystemExit(1) from None
        # A lost or frozen rank: one message naming it instead of every rank's backend traceback,
        # and no rank left behind waiting in a collective.
        launcher = trainer.strategy.launcher
        print("\n" + lost_rank_message(kind, trainer.global_rank, launcher, trainer.global_step)
              + f"\n  (the backend said: {first_line(exc)})", flush=True)
        stop_local_ranks(launcher)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(1) from None

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    summary = summarize(cfg, trainer, loggers, metrics, ckpt_path) if trainer.is_global_zero else None
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()  # the next job of a sweep must start its own run, not reuse this one
    if summary:
        print(summary, flush=True)
    return metrics


def _chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def continue_command(cfg, step: int) -> str:
    """The command that continues this run (a sweep's job too: its own overrides, not the sweep's):
    the run dir, resume=true, and trainer.max_steps to the planned end, or twice the steps done."""
    import shlex

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
    ckpt_dir = cfg.callbacks.model_checkpoint.dirpath
    lines = [f"outputs      {cfg.paths.output_dir}",
             f"checkpoints  {ckpt_dir}",
             f"continue     {continue_command(cfg, step)}"]
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


if __name__ == "__main__":
    main()
