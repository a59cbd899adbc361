"""Unit tier: the per-batch facts (BatchShard) made once per batch by the sequence-parallel core."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ring_lightning.parallel.core import SequenceParallel
from ring_lightning.parallel.step import UNSHARDED
from ring_lightning.sequence import sharding
from ring_lightning.sequence.dims import ParallelDims


def _batch(seq_len: int = 16):
    ids = torch.arange(2 * seq_len).view(2, seq_len)
    labels = ids.clone()
    labels[:, :12] = -100  # labelled tokens only at the end: the zigzag shards hold unequal shares
    return {"input_ids": ids, "labels": labels}


def _core() -> SequenceParallel:
    return SequenceParallel("mean", shift_labels=False, label_key="labels", ignore_index=-100)


def test_each_batch_makes_one_immutable_record_read_by_backward():
    core, dims = _core(), ParallelDims(2, 2, layout="zigzag")
    assert core.batch is UNSHARDED and core.batch.layout == "contiguous"
    out = core.shard(_batch(), dims, global_rank=1, module=None)
    first = core.batch
    assert (first.layout, first.seq_len) == ("zigzag", 16)
    torch.testing.assert_close(first.positions, sharding.sequence_positions(16, 2, 1, "zigzag"))
    torch.testing.assert_close(out["position_ids"], first.positions.expand(2, -1))
    # rank 1 of 2 in zigzag holds chunks 1 and 2 of 4: positions 4..11, no labelled token
    assert float(first.loss_scale) == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.loss_scale = 1.0
    loss = torch.tensor(3.0)
    assert core.scale_for_backward(loss).item() == 0.0
    core.shard(_batch(), dims, global_rank=0, module=None)  # rank 0 holds chunks 0 and 3: every label
    assert core.batch is not first and float(core.batch.loss_scale) == pytest.approx(2.0)
    assert float(first.loss_scale) == 0.0  # the earlier batch's facts are untouched


def test_a_loss_the_module_reduced_itself_is_not_rescaled():
    core = _core()
    core.shard(_batch(), ParallelDims(2, 2, layout="zigzag"), global_rank=0, module=None)
    core.batch = core.batch.with_final_loss()  # what reduce_token_loss records
    assert core.batch.backward_scale is None
    assert core.scale_for_backward(torch.tensor(3.0)).item() == 3.0
    loss, mean = _core().reduce_token_loss(torch.tensor(6.0), 4, sp=1)
    assert loss.item() == pytest.approx(1.5) and mean.item() == pytest.approx(1.5)


def test_one_rank_splits_nothing_inside_the_step():
    core = _core()
    out = core.shard(_batch(), ParallelDims(1, 1, layout="zigzag"), global_rank=0, module=None)
    assert core.batch.layout == "contiguous" and core.batch.loss_scale is None
    torch.testing.assert_close(out["input_ids"], _batch()["input_ids"])
    with core.in_step():
        assert sharding.active_sequence_sharding() is sharding.NOTHING_SPLIT
    plain = [torch.zeros(2, 4)]
    assert core.shard(plain, ParallelDims(1, 1), 0, None) is plain
    assert core.batch.seq_len == 0  # a batch passed through unsharded: no sequence facts
