"""Full sequences in, full sequences out: the shard / gather around a ring call whose
caller passed the whole sequence on every rank (``already_split=False``)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..sequence.sharding import rank_pieces, shard_sequence, unshard_sequence


class GatherSequence(torch.autograd.Function):
    """All-gather shards into the full sequence; backward keeps this rank's positions only.

    Every rank computes the same loss from the gathered output, so each rank's gradient of
    the full output is already complete: it takes its own slice, no reduction needed.
    """

    @staticmethod
    def forward(fctx, x, group, layout, rank):
        world = dist.get_world_size(group)
        shards = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(shards, x.contiguous(), group=group)
        fctx.meta = (world, rank, layout)
        return unshard_sequence(shards, layout, dim=1)

    @staticmethod
    def backward(fctx, grad):
        world, rank, layout = fctx.meta
        return shard_sequence(grad, world, rank, layout, dim=1).contiguous(), None, None, None


class ShardSequence(torch.autograd.Function):
    """Take this rank's shard of a full sequence; backward scatters into zeros elsewhere."""

    @staticmethod
    def forward(fctx, x, world, rank, layout):
        fctx.meta = (x.shape, world, rank, layout)
        return shard_sequence(x, world, rank, layout, dim=1).contiguous()

    @staticmethod
    def backward(fctx, grad):
        shape, world, rank, layout = fctx.meta
        full = grad.new_zeros(shape)
        for p in rank_pieces(shape[1], world, rank, layout):
            full.narrow(1, p.start, p.length).copy_(grad.narrow(1, p.local_offset, p.length))
        return full, None, None, None
