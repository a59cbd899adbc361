"""Per-rank code for test_strategy.py (imported by spawned processes), and its sp=1 reference.

A user's own small causal LM (not the reference model): token + learned position
embedding -> one ring attention block -> vocabulary head. Two flavours of the attention:
``multihead`` (MultiheadRingAttention) and ``core`` (the user's q/k/v projections around a
``create_ring_attention`` core). Both call the attention with ``already_split=True``, so
with ``sp > 1`` each rank sees only its shard, positions included.

The data set is two steps' worth of batches per epoch (so a checkpoint at the end of
epoch 0 resumes at an epoch boundary) with ignored labels (-100) spread unevenly over
the shards of a sequence group, so token-count weighting matters.
"""

from __future__ import annotations

import os
from typing import Dict, List

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ring_lightning.attention import MultiheadRingAttention, create_ring_attention
from ring_lightning.parallel.strategy import RingStrategy

VOCAB, EMBED, HEADS, SEQ, BATCH = 32, 16, 4, 16, 2
STEPS_PER_EPOCH = 2
LR, MOMENTUM = 0.1, 0.9
IGNORE = -100


class TokenData(Dataset):
    """``num_samples`` random sequences; labels are the next token, some ignored."""

    def __init__(self, num_samples: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, VOCAB, (num_samples, SEQ + 1), generator=gen)
        self.input_ids = tokens[:, :-1]
        self.labels = tokens[:, 1:].clone()
        # Ignored labels, unevenly over the shards (zigzag over 2 ranks: rank 0 holds
        # positions 0-3 and 12-15, rank 1 holds 4-11).
        self.labels[0, :6] = IGNORE
        if num_samples > 3:
            self.labels[3, 2:15] = IGNORE  # almost a whole sample
        if num_samples > 5:
            self.labels[5, ::3] = IGNORE

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "sample_id": torch.tensor(i)}


class TinyRingLM(LightningModule):
    """The user's module; records per-step losses, synced gradients and samples."""

    is_causal = True

    def __init__(self, attention: str = "multihead") -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, EMBED)
        self.pos = nn.Embedding(SEQ, EMBED)
        self.attention_kind = attention
        if attention == "multihead":
            self.attn = MultiheadRingAttention(EMBED, HEADS, batch_first=True)
        else:
            self.qkv = nn.Linear(EMBED, 3 * EMBED)
            self.core = create_ring_attention("standard")
            self.proj = nn.Linear(EMBED, EMBED)
        self.head = nn.Linear(EMBED, VOCAB)
        self.record: Dict[str, List] = {"loss": [], "grads": [], "samples": [], "val_loss": [], "positions": []}

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids) + self.pos(position_ids)  # (B, T, E)
        if self.attention_kind == "multihead":
            a, _ = self.attn(x, x, x, need_weights=False, is_causal=True, already_split=True)
        else:
            B, T, _ = x.shape
            q, k, v = self.qkv(x).view(B, T, 3, HEADS, EMBED // HEADS).unbind(2)  # each (B, T, H, D)
            a = self.proj(self.core(q, k, v, is_causal=True, already_split=True).reshape(B, T, EMBED))
        return self.head(x + a)  # (B, T, V)

    def token_loss(self, batch):
        logits = self(batch["input_ids"], batch["position_ids"])
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum"
        )
        num_tokens = (batch["labels"] != IGNORE).sum()
        reduce = getattr(self.trainer.strategy, "reduce_token_loss", None) if self._trainer else None
        if reduce is None:
            return loss_sum / num_tokens.clamp(min=1), loss_sum.detach() / num_tokens.clamp(min=1)
        return reduce(loss_sum, num_tokens)

    def training_step(self, batch, batch_idx):
        loss, mean_loss = self.token_loss(batch)
        self.record["loss"].append(mean_loss.item())
        self.record["samples"].append(batch["sample_id"].tolist())
        self.record["positions"].append(batch["position_ids"][0].tolist())
        return loss

    def validation_step(self, batch, batch_idx):
        _, mean_loss = self.token_loss(batch)
        self.log("val_loss", mean_loss, sync_dist=True)  # mean over the world = mean over groups
        self.record["val_loss"].append(mean_loss.item())

    def on_validation_epoch_end(self):
        self.record.setdefault("val_synced", []).append(self.trainer.callback_metrics["val_loss"].item())

    def on_before_optimizer_step(self, optimizer):
        # Runs after backward, so DDP's all-reduce has completed.
        self.record["grads"].append({n: p.grad.detach().clone() for n, p in self.named_parameters()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def _loaders(dp: int):
    train = DataLoader(TokenData(dp * BATCH * STEPS_PER_EPOCH, seed=1), batch_size=BATCH, shuffle=False)
    val = DataLoader(TokenData(dp * BATCH, seed=2), batch_size=BATCH, shuffle=False)
    return train, val


def _lightning_env(rank: int, world_size: int) -> None:
    # The process group already exists (conftest); LOCAL_RANK tells Lightning the
    # processes were launched externally (as under torchrun), so it launches none.
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29555")


def _trainer(world_size: int, strategy: RingStrategy, max_steps: int, ckpt_dir: str) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=world_size, strategy=strategy, max_steps=max_steps,
        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_on_train_epoch_end=True)],
    )


def fit_and_resume(rank: int, world_size: int, sp: int, attention: str, ckpt_dir: str, compression: str) -> Dict:
    """Fit one epoch (2 steps, checkpoint), then resume from it in a fresh Trainer to step 4.

    The resumed model starts from a different random init, so its numbers can only match
    the reference if the checkpoint (weights and optimizer momentum) was loaded.
    """
    _lightning_env(rank, world_size)
    dp = world_size // sp
    kwargs = dict(sequence_parallel_size=sp, compression=compression, compression_ratio=1.0)
    records, info = [], {}
    for run, (seed, max_steps, ckpt) in enumerate(((0, 2, None), (123, 4, os.path.join(ckpt_dir, "last.ckpt")))):
        torch.manual_seed(seed)
        model = TinyRingLM(attention)
        strategy = RingStrategy(**kwargs)
        trainer = _trainer(world_size, strategy, max_steps, ckpt_dir)
        train, val = _loaders(dp)
        trainer.fit(model, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt)
        records.append(model.record)
        if run == 0:
            info = dict(
                sp_rank=strategy.sp_rank, dp_rank=strategy.dp_rank, sp_size=strategy.sp_size,
                dp_size=strategy.dp_size, mesh_shape=tuple(strategy.device_mesh.shape),
                mesh_axes=tuple(strategy.device_mesh.mesh_dim_names),
                module_mesh_is_strategy_mesh=model.device_mesh is strategy.device_mesh,
                sp_group_ranks=sorted(torch.distributed.get_process_group_ranks(strategy.sp_group)),
                sampler=strategy.distributed_sampler_kwargs,
                layout=strategy.sequence_layout,
            )
        info[f"compression_ratio_{run}"] = strategy.compression_ratio
    merged = {k: records[0][k] + records[1][k] for k in ("loss", "grads", "samples", "positions")}
    merged["val_loss"] = records[0]["val_loss"] + records[1]["val_loss"]
    merged["val_synced"] = records[0]["val_synced"] + records[1]["val_synced"]
    merged["info"] = info
    return merged


# ---------------------------------------------------------------------- sp = 1 reference


def _reference_losses(model: TinyRingLM, batches: List[Dict]) -> List[torch.Tensor]:
    out = []
    for b in batches:
        pos = torch.arange(SEQ).expand(b["input_ids"].shape[0], SEQ)
        logits = model(b["input_ids"], pos)
        loss_sum = F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
        out.append(loss_sum / (b["labels"] != IGNORE).sum().clamp(min=1))
    return out


def sampler_order(dp: int, d: int, epoch: int, num_samples: int) -> List[int]:
    """What Lightning's training DistributedSampler hands replica ``d`` (always shuffled, seed 0)."""
    sampler = DistributedSampler(range(num_samples), num_replicas=dp, rank=d, shuffle=True, seed=0)
    sampler.set_epoch(epoch)
    return list(sampler)


def reference_run(dp: int, attention: str, samples: List[List[List[int]]]) -> Dict:
    """Single process, no process group: what DDP over ``dp`` replicas with sp=1 computes.

    Args:
        dp: number of data-parallel replicas.
        attention: ``multihead`` or ``core``.
        samples: ``samples[step][d]``, the sample ids replica ``d`` trained on at ``step``
            (the test checks them against the sampler separately).

    Returns:
        Per step: each replica's token-mean loss, the replica-averaged gradients (what
        DDP produces) and, after each epoch, each replica's validation loss.
    """
    torch.manual_seed(0)
    model = TinyRingLM(attention)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    train, val = TokenData(dp * BATCH * STEPS_PER_EPOCH, seed=1), TokenData(dp * BATCH, seed=2)

    def batch(ds, ids):
        items = [ds[i] for i in ids]
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    out: Dict[str, List] = {"loss": [], "grads": [], "val_loss": []}
    for step, step_samples in enumerate(samples):
        losses = _reference_losses(model, [batch(train, ids) for ids in step_samples])
        opt.zero_grad()
        (sum(losses) / dp).backward()
        out["loss"].append([l.item() for l in losses])
        out["grads"].append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
        opt.step()
        if (step + 1) % STEPS_PER_EPOCH == 0:
            # Validation is not shuffled: replica d reads samples d, d + dp, ...
            val_batches = [batch(val, list(range(d, len(val), dp))) for d in range(dp)]
            with torch.no_grad():
                out["val_loss"].append([l.item() for l in _reference_losses(model, val_batches)])
    return out


# ---------------------------------------------------------------------- bad configurations


class NoRingLM(TinyRingLM):
    """The same LM with torch's own attention: it cannot see the other shards."""

    def __init__(self) -> None:
        super().__init__("multihead")
        self.attn = nn.MultiheadAttention(EMBED, HEADS, batch_first=True)

    def forward(self, input_ids, position_ids):
        x = self.tok(input_ids) + self.pos(position_ids)
        return self.head(x + self.attn(x, x, x, need_weights=False)[0])


class TwoLayoutLM(TinyRingLM):
    """Two ring attention modules whose configs insist on different layouts."""

    def __init__(self) -> None:
        super().__init__("multihead")
        self.attn = MultiheadRingAttention(EMBED, HEADS, batch_first=True, layout="zigzag")
        self.attn2 = MultiheadRingAttention(EMBED, HEADS, batch_first=True, layout="contiguous")


class ThreeHeadLM(TinyRingLM):
    """A ring attention core over 3 heads: no all-to-all over 2 ranks can split them."""

    def __init__(self) -> None:
        super().__init__("core")
        self.qkv, self.proj = nn.Linear(EMBED, 3 * 3 * 4), nn.Linear(3 * 4, EMBED)

    def forward(self, input_ids, position_ids):
        x = self.tok(input_ids) + self.pos(position_ids)
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 3, 4).unbind(2)  # each (B, T, H=3, D=4)
        return self.head(x + self.proj(self.core(q, k, v, is_causal=True, already_split=True).reshape(B, T, 12)))


class ShortData(TokenData):
    """Sequences of length SEQ - 1: not splittable over 2 ranks."""

    def __getitem__(self, i):
        item = super().__getitem__(i)
        return {k: (v[:-1] if v.dim() else v) for k, v in item.items()}


def setup_errors(rank: int, world_size: int, ckpt_dir: str) -> Dict[str, Dict]:
    """Each bad configuration under sp=2: the error message and how far training got."""
    _lightning_env(rank, world_size)
    cases = {
        "no_ring_attention": (NoRingLM, TokenData, {}),
        "unsplittable_length": (lambda: TinyRingLM("multihead"), ShortData, {}),
        "modules_disagree_on_layout": (TwoLayoutLM, TokenData, {}),
        "heads_not_divisible_by_ulysses_size": (ThreeHeadLM, TokenData, {"ulysses_size": 2}),
    }
    out = {}
    for name, (make_model, make_data, kwargs) in cases.items():
        torch.manual_seed(0)
        model = make_model()
        trainer = _trainer(world_size, RingStrategy(sequence_parallel_size=2, **kwargs), 2, ckpt_dir)
        loader = DataLoader(make_data(BATCH * STEPS_PER_EPOCH, seed=1), batch_size=BATCH)
        try:
            trainer.fit(model, train_dataloaders=loader)
            out[name] = {"error": None}
        except ValueError as exc:
            out[name] = {"error": str(exc)}
        except SystemExit as exc:  # ring_usage.raise_once: ranks other than 0 leave the message to rank 0
            out[name] = {"error": f"SystemExit({exc.code})"}
        out[name].update(global_step=trainer.global_step, forwards=len(model.record["loss"]))
    return out
