"""Per-rank code for test_fsdp.py: the user's module and LongDocumentLM under RingFSDPStrategy.

The modules are test_user_module.py's (``_user_module_worker``), with AdamW, recording what
the test compares as whole tensors: under FSDP2 a parameter and its gradient are this rank's
shard (a DTensor), so each is gathered (``full_tensor``, a collective every rank makes alike).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

import _strategy_worker as W
import _user_module_worker as U
from ring_lightning.parallel.fsdp import RingFSDPStrategy
from ring_lightning.parallel.strategy import RingStrategy

LR = 1e-2


def _whole(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


class AdamWMeanLossLM(U.MeanLossLM):
    """The user's plain mean cross-entropy module, trained with AdamW."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=LR)

    def on_before_optimizer_step(self, optimizer):
        self.record["grads"].append({n: _whole(p.grad) for n, p in self.named_parameters()})


class SGDMeanLossLM(AdamWMeanLossLM):
    """The user's module with its own SGD (momentum): the step is proportional to the gradient, so
    a wrong clipping scale shows in the parameters (AdamW would nearly cancel it)."""

    def configure_optimizers(self):
        return U.MeanLossLM.configure_optimizers(self)


class WholeGradDocumentLM(U.RecordingDocumentLM):
    """LongDocumentLM (its own AdamW and schedule), recording whole gradients."""

    def on_before_optimizer_step(self, optimizer):
        self.record["grads"].append({n: _whole(p.grad) for n, p in self.named_parameters()})


class WeightDtypeLM(AdamWMeanLossLM):
    """The user's module, recording the dtypes its weights have inside the step (FSDP2 gathers
    them in its mixed-precision policy's ``param_dtype``) and its losses."""

    def training_step(self, batch, batch_idx):
        self.record.setdefault("compute_dtypes", set()).update(str(p.dtype) for p in self.parameters())
        loss = super().training_step(batch, batch_idx)
        self.record.setdefault("losses", []).append(float(loss.detach() if isinstance(loss, torch.Tensor)
                                                          else loss["loss"].detach()))
        return loss


class OptionsDocumentLM(WholeGradDocumentLM):
    """``WholeGradDocumentLM`` with 3 blocks (a group of 2 and a group of 1 when recomputed in
    pairs) and the memory options ``options`` (ModelConfig fields) on; ``loss_chunk_tokens``: the
    module's chunked loss (the final norm inside it, per chunk)."""

    def __init__(self, options: Dict, loss_chunk_tokens: Optional[int] = None) -> None:
        torch.manual_seed(0)
        U.LongDocumentLM.__init__(
            self, model={"preset": "tiny", "vocab_size": W.VOCAB, "n_layers": 3, **options}, warmup_steps=0,
            lr=1e-2, max_steps=U.STEPS, loss_chunk_tokens=loss_chunk_tokens,
            attention={"variant": "standard", "segment_lengths": [4, W.SEQ], "dilation_rates": [1, 4]})
        self.record = {"loss": [], "grads": [], "samples": []}


MODELS = {"user": AdamWMeanLossLM, "model": WholeGradDocumentLM, "dtypes": WeightDtypeLM}


def fit(rank: int, world_size: int, sp: int, kind: str, ckpt_dir: str, **strategy_kwargs) -> Dict:
    """U.STEPS steps of ``MODELS[kind]`` under RingFSDPStrategy(sequence_parallel_size=sp, **strategy_kwargs)."""
    W._lightning_env(rank, world_size)
    torch.manual_seed(0)
    model = MODELS[kind]()
    strategy = RingFSDPStrategy(sequence_parallel_size=sp, **strategy_kwargs)
    trainer = W._trainer(world_size, strategy, U.STEPS, os.path.join(ckpt_dir, kind))
    dp = world_size // sp
    loader = DataLoader(U.DATA["uneven"](dp * W.BATCH * U.STEPS, seed=1), batch_size=W.BATCH)
    trainer.fit(model, train_dataloaders=loader)
    saved = torch.load(os.path.join(ckpt_dir, kind, "last.ckpt"), map_location="cpu", weights_only=False)
    local = {n: p.to_local().numel() if isinstance(p, DTensor) else p.numel() for n, p in model.named_parameters()}
    return {"grads": model.record["grads"], "samples": model.record["samples"], "loss": model.record.get("loss"),
            "params": {n: _whole(p) for n, p in model.named_parameters()},
            "local_numel": sum(local.values()), "sp_rank": strategy.sp_rank, "dp_rank": strategy.dp_rank,
            "checkpoint": {k: v for k, v in saved["state_dict"].items() if isinstance(v, torch.Tensor)},
            "checkpoint_step": saved["global_step"], "compute_dtypes": model.record.get("compute_dtypes"),
            "losses": model.record.get("losses"),
            "master_dtypes": {str(p.dtype) for p in model.parameters()},
            "grad_dtypes": {str(p.grad.dtype) for p in model.parameters() if p.grad is not None}}


def fit_policies(rank: int, world_size: int, sp: int, ckpt_dir: str) -> Dict:
    """LongDocumentLM under RingFSDPStrategy as it is, with the model state offloaded to the host,
    and the user's module without and with bf16 mixed precision (FSDP2's policies)."""
    runs = {"plain": ("model", {}), "offload": ("model", {"offload_params": True}),
            "fp32": ("dtypes", {"mixed_precision": "none"}), "bf16": ("dtypes", {"mixed_precision": "bf16"})}
    return {name: fit(rank, world_size, sp, kind, os.path.join(ckpt_dir, name), **kwargs)
            for name, (kind, kwargs) in runs.items()}


def fit_and_resume(rank: int, world_size: int, sp: int, ckpt_dir: str, sharded: bool = False) -> Dict:
    """The user's module: 2 steps (one epoch, a gathered checkpoint), then a fresh Trainer from
    another init resumed from it to step 4; under RingFSDPStrategy and under RingStrategy (DDP),
    whose resume (weights, AdamW moments, data position) is the yardstick. ``sharded``: the FSDP
    checkpoint is a folder of shards (``save_distributed_checkpoint=True``) instead of one file."""
    W._lightning_env(rank, world_size)
    dp, out = world_size // sp, {}
    strategies = {"fsdp": lambda **kw: RingFSDPStrategy(save_distributed_checkpoint=sharded, **kw), "ddp": RingStrategy}
    for name, make_strategy in strategies.items():
        run_dir = os.path.join(ckpt_dir, name)
        for seed, max_steps, resume in ((0, 2, None), (123, 4, os.path.join(run_dir, "last.ckpt"))):
            torch.manual_seed(seed)
            model = AdamWMeanLossLM()
            init = {n: _whole(p) for n, p in model.named_parameters()}
            trainer = W._trainer(world_size, make_strategy(sequence_parallel_size=sp), max_steps, run_dir)
            loader = DataLoader(U.DATA["uneven"](dp * W.BATCH * 2, seed=1), batch_size=W.BATCH)
            trainer.fit(model, train_dataloaders=loader, ckpt_path=resume)
        out[name] = {"init": init, "samples": model.record["samples"], "step": trainer.global_step,
                     "checkpoint_is_folder": os.path.isdir(os.path.join(run_dir, "last.ckpt")),
                     "params": {n: _whole(p) for n, p in model.named_parameters()}}
    return out


def fit_fsdp_and_ddp(rank: int, world_size: int, sp: int, kind: str, ckpt_dir: str) -> Dict:
    """``MODELS[kind]`` under RingFSDPStrategy, then under RingStrategy (DDP), at the same sp."""
    fsdp = fit(rank, world_size, sp, kind, ckpt_dir)
    ddp = U._fit(rank, world_size, sp, "uneven", os.path.join(ckpt_dir, "ddp"), make_model=MODELS[kind])
    ddp["grads"] = [{n: g.detach().clone() for n, g in step.items()} for step in ddp["grads"]]
    return {"fsdp": fsdp, "ddp": ddp}


def fit_clipped(rank: int, world_size: int, sp: int, clip: float, ckpt_dir: str) -> Dict:
    """The user's module with ``gradient_clip_val=clip`` under RingFSDPStrategy and RingStrategy:
    the norm over sharded gradients must be the whole gradient's norm (what DDP clips by)."""
    from lightning.pytorch import Trainer

    W._lightning_env(rank, world_size)
    out = {}
    for name, make_strategy in {"fsdp": RingFSDPStrategy, "ddp": RingStrategy}.items():
        torch.manual_seed(0)
        model = SGDMeanLossLM()
        trainer = Trainer(accelerator="cpu", devices=world_size, strategy=make_strategy(sequence_parallel_size=sp),
                          max_steps=U.STEPS, gradient_clip_val=clip, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False)
        loader = DataLoader(U.DATA["uneven"](world_size // sp * W.BATCH * U.STEPS, seed=1), batch_size=W.BATCH)
        trainer.fit(model, train_dataloaders=loader)
        out[name] = {"params": {n: _whole(p) for n, p in model.named_parameters()},
                     "grad_norms": [float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in step.values()])))
                                    for step in model.record["grads"]]}
    return out


def fit_memory_options(rank: int, world_size: int, sp: int, option_sets: List[Tuple[Dict, Optional[int]]]
                       ) -> List[Dict]:
    """``OptionsDocumentLM(options, loss_chunk_tokens)`` for each of ``option_sets`` under
    RingFSDPStrategy and RingStrategy (DDP) at the same sp: each step's losses and whole
    gradients, and the final parameters."""
    from lightning.pytorch import Trainer

    W._lightning_env(rank, world_size)
    dp, out = world_size // sp, []
    for options, loss_chunk_tokens in option_sets:
        run = {}
        for name, strategy in (("fsdp", RingFSDPStrategy), ("ddp", RingStrategy)):
            model = OptionsDocumentLM(options, loss_chunk_tokens)
            trainer = Trainer(accelerator="cpu", devices=world_size, strategy=strategy(sequence_parallel_size=sp),
                              max_steps=U.STEPS, logger=False, enable_progress_bar=False,
                              enable_model_summary=False, enable_checkpointing=False)
            loader = DataLoader(U.DATA["uneven"](dp * W.BATCH * U.STEPS, seed=1), batch_size=W.BATCH)
            trainer.fit(model, train_dataloaders=loader)
            run[name] = {"grads": model.record["grads"], "loss": model.record["loss"],
                         "params": {n: _whole(p) for n, p in model.named_parameters()}}
        out.append(run)
    return out


class NaNGradientLM(AdamWMeanLossLM):
    """The user's module whose second step has a NaN in rank 0's shard of one gradient only."""

    def on_after_backward(self):
        if self.global_step == 1 and self.global_rank == 0:
            grad = next(iter(self.parameters())).grad
            (grad.to_local() if isinstance(grad, DTensor) else grad).view(-1)[0] = float("nan")

    def on_before_optimizer_step(self, optimizer):
        pass  # a skipped step has no gradients to record


def fit_non_finite_skip(rank: int, world_size: int, sp: int, ckpt_dir: str) -> Dict:
    """``NonFiniteGuard(policy="skip")`` under RingFSDPStrategy: every rank must skip the step
    whose NaN sits in one rank's gradient shard, or the shards would step apart."""
    from lightning.pytorch import Trainer

    from ring_lightning.training.callbacks import NonFiniteGuard

    W._lightning_env(rank, world_size)
    torch.manual_seed(0)
    model, guard = NaNGradientLM(), NonFiniteGuard(policy="skip", max_skips=3, check_every_n_steps=1)
    trainer = Trainer(accelerator="cpu", devices=world_size, strategy=RingFSDPStrategy(sequence_parallel_size=sp),
                      max_steps=U.STEPS, callbacks=[guard], logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    loader = DataLoader(U.DATA["uneven"](world_size // sp * W.BATCH * U.STEPS, seed=1), batch_size=W.BATCH)
    trainer.fit(model, train_dataloaders=loader)
    return {"skipped": guard.skipped, "params": {n: _whole(p) for n, p in model.named_parameters()}}


class GradPresenceLM(OptionsDocumentLM):
    """``OptionsDocumentLM`` recording, per step, the parameters that reach the optimizer without a gradient."""

    def on_before_optimizer_step(self, optimizer):
        self.record.setdefault("no_grad", []).append(sorted(n for n, p in self.named_parameters() if p.grad is None))
        self.record["grads"].append({n: _whole(p.grad) for n, p in self.named_parameters() if p.grad is not None})


def fit_validated(rank: int, world_size: int, sp: int, options: Dict, reshard_after_forward: bool) -> Dict:
    """``GradPresenceLM(options)`` under RingFSDPStrategy and RingStrategy (DDP) with a validation
    before the first step (the sanity check) and after every step."""
    from lightning.pytorch import Trainer

    W._lightning_env(rank, world_size)
    dp, run = world_size // sp, {}
    for name, strategy in (("fsdp", RingFSDPStrategy(sequence_parallel_size=sp,
                                                     reshard_after_forward=reshard_after_forward)),
                           ("ddp", RingStrategy(sequence_parallel_size=sp))):
        model = GradPresenceLM(options)
        trainer = Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=U.STEPS,
                          num_sanity_val_steps=1, val_check_interval=1, limit_val_batches=1, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        loader = DataLoader(U.DATA["uneven"](dp * W.BATCH * U.STEPS, seed=1), batch_size=W.BATCH)
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
        run[name] = {"grads": model.record["grads"], "no_grad": model.record["no_grad"]}
    return run


class _FailingWriter(TorchCheckpointIO):
    """A checkpoint writer whose every write fails (``meta.pt``, the one file rank 0 alone writes)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        raise OSError(f"simulated failure writing {os.path.basename(path)}")


def fit_and_fail_to_publish(rank: int, world_size: int, sp: int, ckpt_dir: str, failure: str = "incomplete") -> Dict:
    """The user's module under ``save_distributed_checkpoint=True``: 2 steps (a folder ``last.ckpt``),
    then a run resumed to step 4 whose folder save fails: ``"incomplete"``: rank 0 alone sees the
    staged folder incomplete (as on node-local disks: the other node's shards are not there);
    ``"no_room"``: rank 0's disk has less free space than the shards; ``"full_mid_write"``: the
    disk fills while DCP writes (DCP's own error, which names no errno, as seen on an H200);
    ``"meta_write"``: rank 0 alone fails, writing ``meta.pt`` after every rank wrote its shard;
    ``"publish"``: rank 0's rename of the complete staged folder fails; ``"mkdir"``: rank 1 alone
    cannot create the staging folder (before DCP's collectives).
    Returns the error each rank raised and what the checkpoint directory holds afterwards."""
    import shutil

    import lightning.fabric.strategies.fsdp as fabric_fsdp
    import torch.distributed as dist

    import ring_lightning.parallel.sharded_checkpoint as folders
    from ring_lightning.training.checkpoint_io import checkpoint_step, readable

    W._lightning_env(rank, world_size)
    dp, error = world_size // sp, None
    real_usage, full = shutil.disk_usage, []
    real_complete, real_publish, real_makedirs = folders.folder_complete, folders.publish, os.makedirs
    for max_steps, resume in ((2, None), (4, os.path.join(ckpt_dir, "last.ckpt"))):
        if resume and failure == "incomplete" and rank == 0:
            folders.folder_complete = lambda path: False
        if resume and failure == "mkdir" and rank == 1:
            def makedirs_fails(path, *args, **kwargs):
                if ".tmp-" in os.fspath(path):
                    raise PermissionError(f"cannot create {path}")
                return real_makedirs(path, *args, **kwargs)
            os.makedirs = makedirs_fails
        if resume and failure == "publish" and rank == 0:
            def publish_fails(staged, path):
                raise OSError(f"cannot rename {staged}")
            folders.publish = publish_fails
        if resume and failure == "no_room" and rank == 0:
            shutil.disk_usage = lambda path: real_usage(path)._replace(free=1000)
        if resume and failure == "full_mid_write":
            def fill_then_fail(state, path, real=fabric_fsdp._distributed_checkpoint_save):
                (path / "__partial.distcp").write_bytes(b"x" * 100)
                full.append(True)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
            fabric_fsdp._distributed_checkpoint_save = fill_then_fail
            shutil.disk_usage = lambda path: real_usage(path)._replace(free=0) if full else real_usage(path)
        torch.manual_seed(0)
        # a short timeout: a rank left waiting in a collective fails the test in seconds, not 30 minutes
        strategy = RingFSDPStrategy(sequence_parallel_size=sp, save_distributed_checkpoint=True,
                                    timeout=timedelta(seconds=30))
        if resume and failure == "meta_write" and rank == 0:
            strategy.checkpoint_io = _FailingWriter()
        trainer = W._trainer(world_size, strategy, max_steps, ckpt_dir)
        loader = DataLoader(U.DATA["uneven"](dp * W.BATCH * 2, seed=1), batch_size=W.BATCH)
        try:
            trainer.fit(AdamWMeanLossLM(), train_dataloaders=loader, ckpt_path=resume)
        except (RuntimeError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    shutil.disk_usage, folders.folder_complete, folders.publish = real_usage, real_complete, real_publish
    os.makedirs = real_makedirs
    dist.barrier()  # every rank has raised: rank 0 has removed the staging folder
    last = os.path.join(ckpt_dir, "last.ckpt")
    return {"error": error, "entries": sorted(os.listdir(ckpt_dir)), "last_is_folder": os.path.isdir(last),
            "last_step": checkpoint_step(last), "last_readable": readable(last)}


class TwoForwardLM(GradPresenceLM):
    """``GradPresenceLM`` whose training step runs the model twice with gradient (a user's module
    adding a second loss): ``loss + 0.5 * loss again``, two graphs through the same blocks."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.5 * super().training_step(batch, batch_idx)


def fit_two_forwards(rank: int, world_size: int, sp: int, option_sets: List[Tuple[Dict, bool]]) -> List[Dict]:
    """``TwoForwardLM(options)`` under RingFSDPStrategy(reshard_after_forward=...) and RingStrategy (DDP),
    for each ``(options, reshard_after_forward)`` of ``option_sets``: each step's whole gradients, or
    the error the fit raised."""
    from lightning.pytorch import Trainer

    W._lightning_env(rank, world_size)
    dp, out = world_size // sp, []
    for options, reshard_after_forward in option_sets:
        run = {}
        for name, strategy in (("fsdp", RingFSDPStrategy(sequence_parallel_size=sp,
                                                         reshard_after_forward=reshard_after_forward)),
                               ("ddp", RingStrategy(sequence_parallel_size=sp))):
            model = TwoForwardLM(options)
            trainer = Trainer(accelerator="cpu", devices=world_size, strategy=strategy, max_steps=U.STEPS,
                              logger=False, enable_progress_bar=False, enable_model_summary=False,
                              enable_checkpointing=False)
            loader = DataLoader(U.DATA["uneven"](dp * W.BATCH * U.STEPS, seed=1), batch_size=W.BATCH)
            try:
                trainer.fit(model, train_dataloaders=loader)
                run[name] = {"grads": model.record["grads"], "no_grad": model.record["no_grad"]}
            except RuntimeError as exc:
                run[name] = {"error": str(exc)}
        out.append(run)
    return out
