"""train(cfg): one run from a composed config: pre-flight, build, fit, the summary.

``train.py`` (the Hydra entry) composes the config and calls :func:`train`; a test or a notebook
composes one itself (``hydra.compose``, with ``paths.output_dir`` set) and calls it in-process.
It lives here, in ``ring_lightning.app`` (what a user runs: the entry, its summary), not in
train.py: a script is not importable from the package, and one-process checks should not need
a subprocess. The pre-flight (``ring_lightning.preflight``) runs first: a user error exits with
status 2 before any process, process group or logger exists.

Outside a Hydra run (no ``HydraConfig``) the job is named ``train`` and the ranks are started
the way ``strategy.start_method`` says.
"""

import os
import sys

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from ring_lightning import preflight

from ring_lightning.app import run_dir

from ring_lightning.training import run_log
from ring_lightning.app.summary import continue_command, summarize
from ring_lightning.training.callbacks import ConfigAgreement, FailureRecord, config_fingerprint, interrupted_by
from ring_lightning.parallel.sharded_checkpoint import CheckpointWriteError
from ring_lightning.training.console import quiet_wandb
from ring_lightning.sequence.faults import (clear_failures, failed_peers, first_line, lost_rank_message,
                                   peer_failed_message, peer_failure, same_error_elsewhere, stop_local_ranks)
from ring_lightning.app.resume_compat import ConfigRecord, load_weights
from ring_lightning.app.run_report import StepMetric


def _hydra_job() -> "tuple[str, bool]":
    """(job name, is a multirun) of the Hydra run in progress; ("train", False) outside one."""
    if not HydraConfig.initialized():
        return "train", False
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.job.name, hydra_cfg.mode == RunMode.MULTIRUN


def launch_start_method(cfg: DictConfig) -> str:
    """How Lightning starts the ranks. Its default ("popen") re-runs this script with the
    same command line; under `-m` that command line is the whole sweep, so every job would
    re-launch it. There the ranks are spawned instead, unless SLURM or torchrun already
    started one process per rank (then Lightning launches nothing)."""
    external = SLURMEnvironment.detect() or TorchElasticEnvironment.detect()
    if _hydra_job()[1] and not external:
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


def train(cfg: DictConfig) -> dict:
    """Train as ``cfg`` says; returns the final logged scalars (``trainer.callback_metrics``).

    Raises:
        SystemExit: 2 for a configuration that cannot run (reported once), 1 after a reported
            error of a rank, 128 + signal after SIGTERM / SIGINT (a checkpoint holds the step).
    """
    # What this rank prints also goes to <run dir>/train.log (rank k: train_ddp_process_<k>.log)
    job = _hydra_job()[0]
    rank = run_log.launch_rank()
    run_log.start(run_log.log_path(cfg.paths.output_dir, job, rank), rank)
    pl.seed_everything(cfg.seed, workers=True)  # the model's initial weights depend on it
    # Pre-flight (ring_lightning/preflight/): every user error is reported here, once, before
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
            if trainer.global_rank == 0:  # once: rank 0 writes a file; every rank refuses a folder alike
                print(f"\nring_lightning: {write_error.strerror}", file=sys.stderr, flush=True)
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
