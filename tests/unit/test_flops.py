"""ring_lightning.flops: the pair count equals a brute-force count over the oracle's masks.

The brute force builds the token masks of ``reference_attention`` (``pattern_mask`` and the
expanded block mask) and counts them in the module's causal convention: a key before the
query counts 1, the query's own position 1/2.
"""

from __future__ import annotations

import pytest
import torch

from ring_lightning.attention.reference import block_to_token_mask, pattern_mask
from ring_lightning.flops import attention_fraction, attention_pairs, flops_from_pairs


def brute_pairs(n, heads, causal, segments=None, rates=None, block_mask=None, block_size=None):
    patterns = [(n, 1)] if segments is None else [(min(w, n), r) for w, r in zip(segments, rates)]
    t = torch.arange(n)
    total = 0.0
    for w, r in patterns:
        mask = pattern_mask(n, heads, w, r, is_causal=False)  # (H, N, N)
        if block_mask is not None:
            mask = mask & block_to_token_mask(block_mask, block_size)[None]
        if causal:
            total += (mask & (t[None, :] < t[:, None])).sum().item()
            total += (mask & (t[None, :] == t[:, None])).sum().item() / 2
        else:
            total += mask.sum().item()
    return total


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
    # the dilated pattern of tests/unit/test_module.py: two patterns of a quarter each
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
