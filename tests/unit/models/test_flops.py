"""ring_lightning.models.flops: the pair count equals a brute-force count over the oracle's masks.

The brute force builds the token masks of ``reference_attention`` (``pattern_mask`` and the
expanded block mask) and counts them in the module's causal convention: a key before the
query counts 1, the query's own position 1/2.
"""

from __future__ import annotations

import math

import pytest
import torch

from pairs_oracle import brute_pairs
from ring_lightning.attention.reference import grid_window_mask
from ring_lightning.models.flops import (
    attention_fraction, attention_pairs, causal_document_pairs_per_rank, flops_from_pairs, grid_window_pairs,
)


def test_dense_closed_forms():
    assert attention_pairs(1024, 8, causal=False) == 8 * 1024**2
    assert attention_pairs(1024, 8, causal=True) == 8 * 1024**2 / 2
    assert attention_fraction(1024, 8, causal=True) == 1.0


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "n, heads, segments, rates",
    [
        (96, 3, [24, 96], [1, 2]),
        (96, 5, [32, 48, 192], [2, 3, 4]),  # 192 clamps to 96; 5 heads over offsets mod 4
        (60, 2, [20, 60], [3, 7]),          # rate larger than the head count
    ],
)
def test_dilated_matches_brute_force(n, heads, segments, rates, causal):
    got = attention_pairs(n, heads, causal=causal, segment_lengths=segments, dilation_rates=rates)
    assert got == brute_pairs(n, heads, causal, segments, rates)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size, segments, rates", [(16, None, None), (12, [32, 96], [1, 2]), (32, [24], [3])])
def test_block_mask_matches_brute_force(block_size, segments, rates, causal):
    n = 96
    g = torch.Generator().manual_seed(block_size)
    mask = torch.rand(n // block_size, n // block_size, generator=g) < 0.5  # not symmetric
    got = attention_pairs(n, 4, causal=causal, segment_lengths=segments, dilation_rates=rates,
                          block_mask=mask, block_size=block_size)
    assert got == brute_pairs(n, 4, causal, segments, rates, mask, block_size)


def test_fraction_and_flops():
    # the dilated pattern of tests/unit/training/test_module.py: two patterns of a quarter each
    frac = attention_fraction(1024, 4, segment_lengths=[256, 1024], dilation_rates=[1, 2])
    assert frac == pytest.approx(256 / 1024 + 1024 / (4 * 1024))
    assert flops_from_pairs(10.0, 64, 2, backward=False) == 4 * 2 * 64 * 10
    assert flops_from_pairs(10.0, 64) == 3.5 * 4 * 64 * 10
    assert flops_from_pairs(10.0, 64, recompute=False) == 3 * 4 * 64 * 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(segment_lengths=[48]), "segment length 48 must divide it"),
        (dict(segment_lengths=[32, 64], dilation_rates=[1]), "same length"),
        (dict(dilation_rates=[2]), "needs segment_lengths"),
        (dict(block_size=16), "only used with block_mask"),
        (dict(block_mask=torch.ones(4, 4, dtype=torch.bool), block_size=16), "shape"),
        (dict(block_mask=torch.ones(4, 4, dtype=torch.bool)), "block_size"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_pairs(128, 2, **kwargs)


# ------------------------------------------------------------------- grids and load balance
def _causal_weight(n):
    """(N, N) weights of the causal convention: key before the query 1, itself 1/2."""
    t = torch.arange(n)
    return (t[None, :] < t[:, None]).double() + (t[None, :] == t[:, None]).double() / 2


@pytest.mark.parametrize("shape,radius", [([8, 8], [1, 2]), ([5, 7], [2, 0]), ([2, 4, 4], [1, 1, 1]), ([3, 4, 5], [0, 2, 9])])
@pytest.mark.parametrize("causal", [False, True])
def test_grid_window_pairs_match_brute_force(shape, radius, causal):
    n = math.prod(shape)
    mask = grid_window_mask(shape, radius).double()
    brute = float((mask * _causal_weight(n)).sum() if causal else mask.sum())
    assert grid_window_pairs(shape, radius, 3, causal=causal) == 3 * brute


def test_document_work_per_rank_by_hand():
    # documents of 16, 32, 16 tokens (16 = 2W for W = 8): a document of L tokens is L^2/2 pairs
    lengths = [16, 32, 16]
    assert causal_document_pairs_per_rank(lengths, 2, "contiguous") == [256.0, 512.0]
    assert causal_document_pairs_per_rank(lengths, 2, "per_document") == [384.0, 384.0]
    assert causal_document_pairs_per_rank(lengths, 2, "zigzag") == [256.0, 512.0]  # chunks 0+3 vs 1+2


# 32 short packed documents (64 tokens, a multiple of 2W for W <= 8), then longer ones, N = 4096:
# the exact causal work of each rank (pairs, one head). The row-level layouts leave the long
# documents' work on a few ranks (max/mean 1.83 / 2.74 / 4.11 contiguous, 1.45 / 2.14 / 2.48
# zigzag at W = 2 / 4 / 8); PyTorch's per-document head-tail balance gives equal shares.
BALANCE_LENGTHS = [64] * 32 + [1024, 512, 256, 128, 64, 64]
BALANCE = {
    2: {"contiguous": [65536.0, 700416.0], "zigzag": [208896.0, 557056.0]},
    4: {"contiguous": [32768.0, 32768.0, 524288.0, 176128.0], "zigzag": [61440.0, 147456.0, 409600.0, 147456.0]},
    8: {"contiguous": [16384.0] * 4 + [131072.0, 393216.0, 131072.0, 45056.0],
        "zigzag": [20480.0, 40960.0, 106496.0, 40960.0, 237568.0, 172032.0, 106496.0, 40960.0]},
}


def test_document_work_per_rank_matches_brute_force_and_pins_the_imbalance():
    from ring_lightning.sequence.sharding import sequence_positions

    n = sum(BALANCE_LENGTHS)
    ids = torch.repeat_interleave(torch.arange(len(BALANCE_LENGTHS)), torch.tensor(BALANCE_LENGTHS))
    per_query = ((ids[:, None] == ids[None, :]).double() * _causal_weight(n)).sum(1)  # (N,)
    for world in (2, 4, 8):
        for layout in ("contiguous", "zigzag"):
            brute = [float(per_query[sequence_positions(n, world, r, layout)].sum()) for r in range(world)]
            assert causal_document_pairs_per_rank(BALANCE_LENGTHS, world, layout) == brute
        balanced = causal_document_pairs_per_rank(BALANCE_LENGTHS, world, "per_document")
        assert balanced == [float(per_query.sum()) / world] * world
    for world, by_layout in BALANCE.items():
        for layout, expected in by_layout.items():
            assert causal_document_pairs_per_rank(BALANCE_LENGTHS, world, layout) == expected, (world, layout)
    with pytest.raises(ValueError, match="multiples of 16"):
        causal_document_pairs_per_rank([8, 16], 8, "per_document")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size, segments, rates", [(None, None, None), (None, [24, 96], [1, 2]),
                                                         (16, None, None), (12, [32, 48], [2, 3])])
def test_batch_pairs_with_documents_match_brute_force(block_size, segments, rates, causal):
    from ring_lightning.models.flops import batch_attention_pairs

    n, heads = 96, 5
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, (2, n), generator=g).sort(dim=1).values
    ids[1, 10:20] = 0  # an id that recurs after other documents: still one document to the mask
    mask = None if block_size is None else torch.rand(n // block_size, n // block_size, generator=g) < 0.5
    got = batch_attention_pairs(n, heads, causal=causal, segment_lengths=segments, dilation_rates=rates,
                                block_mask=mask, block_size=block_size, document_ids=ids)
    want = brute_pairs(n, heads, causal, segments, rates, mask, block_size, document_ids=ids)
    assert got == want
