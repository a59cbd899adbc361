"""The loss contract's pieces without processes: label alignment, the loss scale, the default sharding."""

import pytest
import torch

from ring_lightning.parallel import loss_contract

from ring_lightning.sequence import sharding
from ring_lightning.constants import IGNORE_INDEX


def _batch(labels_follow: bool, pad: int = 0):
    ids = torch.randint(0, 50, (2, 8))
    labels = ids.clone() if labels_follow else torch.randint(0, 50, (2, 8))
    if pad:
        labels[:, -pad:] = IGNORE_INDEX  # a collator's padding
    return {"input_ids": ids, "labels": labels, "loss_mask": (labels != IGNORE_INDEX).float()}


@pytest.mark.parametrize("pad", [0, 3])
def test_hf_labels_are_refused_under_sp_also_with_padding(pad):
    with pytest.raises(ValueError, match="shift_labels=True"):
        loss_contract.align_labels(_batch(True, pad), 2, None, "labels", IGNORE_INDEX)
    loss_contract.align_labels(_batch(True, pad), 1, None, "labels", IGNORE_INDEX)  # sp=1: a shift is fine


def test_shift_moves_labels_and_loss_mask_together():
    batch = _batch(True, pad=2)
    out = loss_contract.align_labels(batch, 2, True, "labels", IGNORE_INDEX)
    assert torch.equal(out["labels"][:, :-1], batch["labels"][:, 1:])
    assert (out["labels"][:, -1] == IGNORE_INDEX).all()
    assert torch.equal(out["loss_mask"][:, :-1], batch["loss_mask"][:, 1:]) and (out["loss_mask"][:, -1] == 0).all()


def test_shifting_labels_that_are_already_aligned_warns():
    with pytest.warns(UserWarning, match="shifted twice"):
        loss_contract.align_labels(_batch(False), 2, True, "labels", IGNORE_INDEX)


def test_mean_scale_counts_labels_not_loss_mask_weights():
    batch = _batch(False)
    batch["labels"][0, :4] = IGNORE_INDEX  # rank 0 (contiguous) holds 4 of the 12 labelled tokens
    batch["loss_mask"] = torch.rand(2, 8)  # weights the scale must not use
    scales = [loss_contract.loss_scale(batch, 2, r, "contiguous", "mean", "labels", IGNORE_INDEX) for r in (0, 1)]
    assert [float(s) for s in scales] == pytest.approx([2 * 4 / 12, 2 * 8 / 12])
    assert loss_contract.loss_scale(batch, 2, 0, "contiguous", "sum", "labels", IGNORE_INDEX) == 2.0
    assert loss_contract.loss_scale(batch, 1, 0, "contiguous", "mean", "labels", IGNORE_INDEX) is None


def test_default_sharding_applies_outside_blocks_and_blocks_win():
    assert sharding.active_sequence_sharding() is None
    previous = sharding.set_default_sequence_sharding(sharding.SequenceSharding(None))
    try:
        assert sharding.active_sequence_sharding().group is None
        with sharding.sequence_sharding(None, "zigzag"):
            assert sharding.active_sequence_sharding().layout == "zigzag"
        assert sharding.active_sequence_sharding().layout == "contiguous"
    finally:
        sharding.set_default_sequence_sharding(previous)
    assert sharding.active_sequence_sharding() is None
