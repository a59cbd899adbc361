"""Per-rank code for test_user_module.py: a user's module with the loss users actually write.

The module (``_strategy_worker.TinyRingLM``: embeddings, q/k/v projections around a
``create_ring_attention`` core, a head) returns ``F.cross_entropy(..., ignore_index=-100)``
with the default mean: no ``reduce_token_loss``, no knowledge of the strategy. Under
``RingStrategy`` its gradients must equal the same module at sp=1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import _strategy_worker as W
from ring_lightning.training.module import LongDocumentLM
from ring_lightning.parallel.strategy import RingStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))  # the README's own_module.py
from own_module import OwnLM  # noqa: E402

STEPS = 4
# Zigzag over 2 ranks with SEQ=16: rank 1 holds positions 4-11.
RANK1_POSITIONS = slice(4, 12)


class MeanLossLM(W.TinyRingLM):
    """The user's module: a plain per-token mean; ``shift_inside`` is the Hugging Face form."""

    def __init__(self, shift_inside: bool = False) -> None:
        super().__init__("core")
        self.shift_inside = shift_inside

    def token_loss(self, batch):
        logits = self(batch["input_ids"], batch["position_ids"])
        labels = batch["labels"]
        if self.shift_inside:  # logits[t] predicts labels[t + 1]
            logits, labels = logits[:, :-1], labels[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=W.IGNORE)
        return loss, loss.detach()


class EmptyShardData(W.TokenData):
    """Every sample's labels on rank 1's positions are ignored: that shard has no labelled token."""

    def __init__(self, num_samples: int, seed: int) -> None:
        super().__init__(num_samples, seed)
        self.labels[:, RANK1_POSITIONS] = W.IGNORE


class InputLabelsData(W.TokenData):
    """The Hugging Face convention: ``labels`` is ``input_ids`` and the model shifts."""

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        return {**item, "labels": item["input_ids"].clone()}


DATA = {"uneven": W.TokenData, "empty_shard": EmptyShardData, "input_labels": InputLabelsData}


class RecordingDocumentLM(LongDocumentLM):
    """The reference model (LongDocumentLM: RoPE, GQA, dilated causal attention whose rates
    exceed H/U, so heads' global offsets matter), recording each step's loss and gradients."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(model={"preset": "tiny", "vocab_size": W.VOCAB}, warmup_steps=0, lr=1e-2, max_steps=STEPS,
                         attention={"variant": "standard", "segment_lengths": [4, W.SEQ], "dilation_rates": [1, 4]})
        self.record: Dict[str, List] = {"loss": [], "grads": [], "samples": []}

    def token_loss(self, batch):
        """What training_step computes at sp=1, for the hand-written reference."""
        batch = self.prepare_batch(batch)
        # the module's own loss path (the chunked head with the final norm inside), as training_step:
        # the reference differs from the sharded run only by the sharding, not by rounding order
        loss_sum, num_tokens, _ = self.loss_sums(batch)
        return self.reduce_loss(loss_sum, num_tokens)

    def training_step(self, batch, batch_idx):
        self.record["samples"].append(batch["sample_id"].tolist())
        return super().training_step(batch, batch_idx)

    def reduce_loss(self, loss_sum, num_tokens):
        loss, mean_loss = super().reduce_loss(loss_sum, num_tokens)
        self.record["loss"].append(mean_loss.item())
        return loss, mean_loss

    def on_before_optimizer_step(self, optimizer):
        self.record["grads"].append({n: p.grad.detach().clone() for n, p in self.named_parameters()})


class RecordingOwnLM(OwnLM):
    """examples/own_module.py's module as written, recording what the test compares."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(vocab_size=W.VOCAB, embed_dim=16, num_heads=4, max_len=W.SEQ, lr=1e-2)
        self.record: Dict[str, List] = {"loss": [], "grads": [], "samples": []}

    def token_loss(self, batch):
        """The sp=1 reference's loss (one process, whole sequences): the module's own."""
        loss = self.loss(batch)
        self.record["loss"].append(loss.item())
        return loss, loss.detach()

    def training_step(self, batch, batch_idx):
        self.record["samples"].append(batch["sample_id"].tolist())
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs, batch, batch_idx):  # what the strategy logged this step
        self.record["loss"].append(float(self.trainer.callback_metrics["train/group_loss"]))

    def on_before_optimizer_step(self, optimizer):
        self.record["grads"].append({n: p.grad.detach().clone() for n, p in self.named_parameters()})


def fit_example(rank: int, world_size: int, ckpt_dir: str) -> Dict:
    """examples/own_module.py's OwnLM for STEPS steps under RingStrategy(sequence_parallel_size=2)."""
    W._lightning_env(rank, world_size)
    return _fit(rank, world_size, 2, "uneven", ckpt_dir, make_model=RecordingOwnLM)


def _fit(rank: int, world_size: int, sp: int, data: str, ckpt_dir: str, shift_inside: bool = False,
         make_model=None, **strategy_kwargs) -> Dict:
    torch.manual_seed(0)
    model = MeanLossLM(shift_inside) if make_model is None else make_model()
    trainer = W._trainer(world_size, RingStrategy(sequence_parallel_size=sp, **strategy_kwargs), STEPS, ckpt_dir)
    dp = world_size // sp
    loader = DataLoader(DATA[data](dp * W.BATCH * STEPS, seed=1), batch_size=W.BATCH)
    trainer.fit(model, train_dataloaders=loader)
    stats = [m.get_profiling_stats() for m in trainer.strategy.ring_attention_modules]
    return {"grads": model.record["grads"], "samples": model.record["samples"], "loss": model.record.get("loss"),
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "ulysses_size": [st["ulysses_size"] for st in stats],
            "all_to_all_bytes": [st["all_to_all_bytes"] for st in stats]}


def fit_mean_loss(rank: int, world_size: int, sp: int, data: str, ckpt_dir: str,
                  loss_reduction: str = "mean", ulysses_size: int = 1) -> Dict:
    """STEPS optimizer steps of the mean-loss module under RingStrategy(sp, loss_reduction, ulysses_size)."""
    W._lightning_env(rank, world_size)
    return _fit(rank, world_size, sp, data, ckpt_dir, loss_reduction=loss_reduction, ulysses_size=ulysses_size)


def fit_hybrid(rank: int, world_size: int, sp: int, ulysses_size: int, ckpt_dir: str) -> Dict:
    """The user's mean-loss module and the reference model, each STEPS steps under
    RingStrategy(sp, ulysses_size=...), in one spawn."""
    W._lightning_env(rank, world_size)
    return {"user": _fit(rank, world_size, sp, "uneven", ckpt_dir, ulysses_size=ulysses_size),
            "model": _fit(rank, world_size, sp, "uneven", ckpt_dir, make_model=RecordingDocumentLM,
                          ulysses_size=ulysses_size)}


def fit_input_labels(rank: int, world_size: int, ckpt_dir: str) -> Dict:
    """labels == input_ids at sp=2: refused by default; shift_labels=True trains."""
    W._lightning_env(rank, world_size)
    out: Dict = {}
    try:
        _fit(rank, world_size, 2, "input_labels", ckpt_dir, shift_inside=True)
        out["refused"] = None
    except ValueError as exc:
        out["refused"] = str(exc)
    out["shifted"] = _fit(rank, world_size, 2, "input_labels", ckpt_dir, shift_labels=True)
    return out


def reference(dp: int, data: str, samples: List[List[List[int]]], shift_inside: bool = False,
              make_model=None) -> Dict:
    """One process, no process group: DDP over ``dp`` replicas of the module at sp=1.

    ``samples[step][d]`` are the sample ids replica ``d`` trained on at ``step``.
    """
    torch.manual_seed(0)
    model = MeanLossLM(shift_inside) if make_model is None else make_model()
    opt, schedule = model.configure_optimizers(), None
    if isinstance(opt, dict):  # LongDocumentLM: AdamW and a per-step LR schedule
        opt, schedule = opt["optimizer"], opt["lr_scheduler"]["scheduler"]
    ds = DATA[data](dp * W.BATCH * STEPS, seed=1)
    grads = []
    for step_samples in samples:
        losses = []
        for ids in step_samples:
            items = [ds[i] for i in ids]
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
            batch["position_ids"] = torch.arange(W.SEQ).expand(len(ids), W.SEQ)
            losses.append(model.token_loss(batch)[0])
        opt.zero_grad()
        (sum(losses) / dp).backward()  # DDP's average over replicas
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        if schedule is not None:
            schedule.step()
    return {"grads": grads, "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "loss": getattr(model, "record", {}).get("loss")}
