"""Rank-side code: the reference model under sequence parallelism equals one device.

LongDocumentLM's transformer (RoPE from GLOBAL positions, GQA, dilated causal ring
attention) on a zigzag-sharded batch, with the strategy's token-weighted loss and DDP's
gradient average done by hand, against the same model on the whole batch in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ring_lightning.training.module import LongDocumentLM
from ring_lightning.sequence.sharding import sequence_positions, sequence_sharding, shard_sequence

SEQ, BATCH = 64, 2


def _module() -> LongDocumentLM:
    torch.manual_seed(0)
    return LongDocumentLM(model={"preset": "tiny", "n_kv_heads": 2}, attention={
        "variant": "standard", "segment_lengths": [16, 64], "dilation_rates": [1, 2]})


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (BATCH, SEQ + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, 5:20] = -100  # ignored positions fall unevenly on the shards
    return {"input_ids": ids[:, :-1], "labels": labels}


def loss_and_grads(rank: int, world: int):
    lm = _module()
    batch = _batch()
    layout = "zigzag" if world > 1 else "contiguous"
    local = {k: shard_sequence(v, world, rank, layout) for k, v in batch.items()}
    positions = sequence_positions(SEQ, world, rank, layout).expand(BATCH, -1)
    with sequence_sharding(dist.group.WORLD if world > 1 else None, layout):  # what the strategy enters
        logits = lm.model(local["input_ids"], positions)
        loss_sum, tokens = lm.compute_loss(logits, local)
        total = tokens.clone().float()
        if world > 1:
            dist.all_reduce(total)
        # the strategy's scaling: DDP's average over the group then equals the one-device gradient
        (loss_sum * world / total).backward()
    grads = {}
    for name, p in lm.named_parameters():
        g = p.grad.clone()
        if world > 1:
            dist.all_reduce(g)
            g /= world
        grads[name] = g
    loss = loss_sum.detach().clone()
    if world > 1:
        dist.all_reduce(loss)
    return float(loss / total), grads
