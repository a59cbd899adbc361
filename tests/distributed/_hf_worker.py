"""Per-rank code for test_hf_models.py: tiny transformers models trained by HFCausalLM under RingStrategy.

Each family is a randomly initialised config (GQA: 4 query heads, 2 kv heads). Batches carry
packed documents (``document_ids``, positions restarting per document) and labels aligned per
position with ignored ones spread unevenly over the shards. The sp=1 reference (:func:`reference`)
is plain transformers on its own ``sdpa``: packed documents through its restarting positions,
the loss ``F.cross_entropy`` over the whole sequence, DDP's average over replicas by hand.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import _strategy_worker as W
from ring_lightning.attention.documents import document_position_ids
from ring_lightning.hf import HFCausalLM
from ring_lightning.parallel.strategy import RingStrategy

VOCAB, SEQ, BATCH, STEPS = 64, 16, 2, 2
IGNORE = -100
FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
SP2_FAMILIES = ("llama", "qwen2", "mistral")  # test time: qwen3 runs on 4 processes instead


def tiny_config(family: str) -> dict:
    return {"model_type": family, "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
            "max_position_embeddings": 64}


class PackedData(Dataset):
    """Random tokens in 2-4 packed documents per sample; some labels ignored (unevenly per shard)."""

    def __init__(self, num_samples: int, seed: int = 1) -> None:
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, VOCAB, (num_samples, SEQ + 1), generator=gen)
        self.input_ids, self.labels = tokens[:, :-1], tokens[:, 1:].clone()
        self.labels[0, :7] = IGNORE
        self.labels[1 % num_samples, 9:15] = IGNORE
        self.labels[2 % num_samples, ::3] = IGNORE
        self.documents = torch.zeros(num_samples, SEQ, dtype=torch.long)
        for i in range(num_samples):
            cuts = torch.randperm(SEQ - 1, generator=gen)[: 1 + i % 3] + 1
            for c in cuts.tolist():
                self.documents[i, c:] += 1

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "document_ids": self.documents[i],
                "sample_id": torch.tensor(i)}


class RecordingHFLM(HFCausalLM):
    """HFCausalLM recording each step's samples, logged loss and synced gradients."""

    def __init__(self, family: str, **kwargs) -> None:
        torch.manual_seed(0)
        super().__init__(config=tiny_config(family), lr=1e-2, warmup_steps=0, max_steps=STEPS,
                         restart_positions_per_document=True, **kwargs)
        self.record: Dict[str, List] = {"loss": [], "grads": [], "samples": []}

    def training_step(self, batch, batch_idx):
        self.record["samples"].append(batch["sample_id"].tolist())
        loss = super().training_step(batch, batch_idx)
        self.record["loss"].append(float(self.trainer.callback_metrics["train/loss"]))
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.record["grads"].append({n: p.grad.detach().clone() for n, p in self.named_parameters()})

    def configure_optimizers(self):
        # SGD, not the module's AdamW: Adam turns a gradient near 0 into a step of about lr whatever
        # its rounding, so later steps would compare rounding, not the method (observed 1e-5 at step 2).
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _fit(world_size: int, family: str, sp: int, ckpt_dir: str, ulysses_size: int = 1, **module_kwargs) -> Dict:
    model = RecordingHFLM(family, **module_kwargs)
    strategy = RingStrategy(sequence_parallel_size=sp, ulysses_size=ulysses_size)
    trainer = W._trainer(world_size, strategy, STEPS, ckpt_dir)
    loader = DataLoader(PackedData((world_size // sp) * BATCH * STEPS), batch_size=BATCH)
    trainer.fit(model, train_dataloaders=loader)
    return {**model.record, "layout": strategy.sequence_layout,
            "ring_calls": sum(m.profiler.calls for m in strategy.ring_attention_modules)}


def _error(fn) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    except SystemExit as exc:
        return f"SystemExit({exc.code})"
    return ""


def fit_sp2(rank: int, world_size: int, ckpt_dir: str) -> Dict:
    """2 processes: every family at sp=2; one with num_items_in_batch; the refusals."""
    W._lightning_env(rank, world_size)
    out = {family: _fit(world_size, family, 2, ckpt_dir) for family in SP2_FAMILIES}
    out["llama_num_items"] = _fit(world_size, "llama", 2, ckpt_dir, num_items_in_batch=True)

    def left_on_sdpa():  # the case: ring cores attached, the model still on sdpa
        model = RecordingHFLM("llama")
        model.model.set_attn_implementation("sdpa")
        trainer = W._trainer(world_size, RingStrategy(sequence_parallel_size=2), STEPS, ckpt_dir)
        trainer.fit(model, train_dataloaders=DataLoader(PackedData(BATCH * STEPS), batch_size=BATCH))

    def cores_never_called():  # a user's module whose ring core sits unused beside local attention
        model = BypassLM()
        trainer = W._trainer(world_size, RingStrategy(sequence_parallel_size=2), STEPS, ckpt_dir)
        trainer.fit(model, train_dataloaders=DataLoader(W.TokenData(BATCH * STEPS, seed=1), batch_size=BATCH))
        return model

    out["left_on_sdpa"] = _error(left_on_sdpa)
    out["cores_never_called"] = _error(cores_never_called)
    return out


class BypassLM(W.TinyRingLM):
    """Has a ring core, attends with plain SDPA on its shard instead."""

    def __init__(self) -> None:
        super().__init__("core")

    def forward(self, input_ids, position_ids):
        x = self.tok(input_ids) + self.pos(position_ids)
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, W.HEADS, W.EMBED // W.HEADS).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, W.EMBED)
        return self.head(x + self.proj(a))


def fit_world4(rank: int, world_size: int, families: List[str], ckpt_dir: str) -> Dict:
    """4 processes: dp=2 x sp=2, and sp=4 as Ulysses 2 x a ring of 2, per family."""
    W._lightning_env(rank, world_size)
    return {family: {"dp2_sp2": _fit(world_size, family, 2, ckpt_dir),
                     "ulysses2_ring2": _fit(world_size, family, 4, ckpt_dir, ulysses_size=2)}
            for family in families}


def reference(family: str, dp: int, samples: List[List[List[int]]]) -> Dict:
    """sp=1 in one process on transformers' own sdpa: per step, each replica's mean cross-entropy
    over its batch, averaged over the dp replicas (what DDP does); the same SGD."""
    module = RecordingHFLM(family)
    model = module.model
    model.set_attn_implementation("sdpa")
    optimizer = module.configure_optimizers()
    data = PackedData(dp * BATCH * STEPS)
    losses, grads = [], []
    for step_samples in samples:
        step_losses = []
        for ids in step_samples:
            batch = {k: torch.stack([data[i][k] for i in ids]) for k in ("input_ids", "labels", "document_ids")}
            positions = document_position_ids(batch["document_ids"])  # transformers reads packing from these
            logits = model(input_ids=batch["input_ids"], position_ids=positions, use_cache=False).logits
            step_losses.append(F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                               ignore_index=IGNORE))
        optimizer.zero_grad()
        (sum(step_losses) / dp).backward()
        losses.append([float(x.detach()) for x in step_losses])
        grads.append({n: p.grad.detach().clone() for n, p in module.named_parameters()})
        optimizer.step()
    return {"loss": losses, "grads": grads}


class PlainHFLM(RecordingHFLM):
    """RecordingHFLM without the gradient record (under FSDP2 the gradients are DTensor shards)."""

    def on_before_optimizer_step(self, optimizer):
        pass


def fit_fsdp_and_export(rank: int, world_size: int, export_dir: str, ckpt_dir: str) -> Dict:
    """Llama under RingFSDPStrategy (sp=world_size), exported with save_pretrained at the end of
    fit; returns the trained parameters, gathered whole, and how many elements this rank held."""
    from torch.distributed.tensor import DTensor

    from ring_lightning.parallel.fsdp import RingFSDPStrategy

    W._lightning_env(rank, world_size)
    model = PlainHFLM("llama", export_dir=export_dir)
    trainer = W._trainer(world_size, RingFSDPStrategy(sequence_parallel_size=world_size), STEPS, ckpt_dir)
    trainer.fit(model, train_dataloaders=DataLoader(PackedData(BATCH * STEPS), batch_size=BATCH))
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in model.model.named_parameters()}
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.model.parameters())
    return {"params": params, "local_numel": local}
