"""Gradient-compression DDP hooks on 2 gloo ranks, checked against a plain all-reduce.

The model is a single weight matrix, so the DDP bucket is ``W.grad.flatten()`` and every
hook's arithmetic can be replayed here entry by entry.
"""

from __future__ import annotations

import math

import pytest
import torch

import _compression_worker as W
from ring_lightning.parallel.compression import COMPRESSION_METHODS, register_compression_hook

pytestmark = pytest.mark.distributed

WORLD = 2
# float32 sums of 2 ranks in a different order: a few ulps.
EXACT_TOL = 1e-6
# PowerSGD's orthogonalisation and matmuls round differently from the plain sum.
POWERSGD_TOL = 1e-5
TOPK_RATIO = 0.25
NUMEL = W.OUT_FEATURES * W.IN_FEATURES
CASES = [
    ("none", 0.1, True),
    ("bf16", 0.1, True),
    ("topk", 1.0, True),
    ("topk", TOPK_RATIO, True),
    ("topk", TOPK_RATIO, False),
    ("randomk", 1.0, True),
    ("randomk", TOPK_RATIO, True),
    ("powersgd", 0.1, True),
]


@pytest.fixture(scope="module")
def results(run_distributed):
    per_rank = run_distributed(W.run_cases, WORLD, CASES, timeout=120)
    return {case: [per_rank[r][case] for r in range(WORLD)] for case in CASES}


def _mean(local):
    return local.mean(dim=0)


def test_register_compression_hook_rejects_bad_arguments():
    with pytest.raises(ValueError, match="valid values"):
        register_compression_hook(None, "gzip")
    with pytest.raises(ValueError, match="compression_ratio"):
        register_compression_hook(None, "topk", ratio=0.0)
    with pytest.raises(ValueError, match="powersgd_rank"):
        register_compression_hook(None, "powersgd", rank=0)
    assert set(COMPRESSION_METHODS) == {"none", "topk", "randomk", "powersgd", "bf16"}


@pytest.mark.parametrize("case", [("none", 0.1, True), ("topk", 1.0, True), ("randomk", 1.0, True)])
def test_lossless_settings_equal_plain_allreduce_mean(results, case):
    for rank_out in results[case]:
        for got, local in zip(rank_out["got"], rank_out["local"]):
            torch.testing.assert_close(got, _mean(local), atol=EXACT_TOL, rtol=EXACT_TOL)


def test_bf16_equals_mean_of_bf16_rounded_gradients(results):
    for rank_out in results[("bf16", 0.1, True)]:
        for got, local in zip(rank_out["got"], rank_out["local"]):
            # Each rank sends bf16(g / 2); the sum of two bf16 numbers is rounded once more.
            expected = (local / WORLD).to(torch.bfloat16).sum(dim=0, dtype=torch.float32)
            expected = expected.to(torch.bfloat16).float()
            torch.testing.assert_close(got, expected, atol=EXACT_TOL, rtol=0)
            assert (got - _mean(local)).abs().max() > 0  # it did lose precision
        assert rank_out["ratio"][-1] == 0.5


def _replay_topk(locals_per_step, ratio, error_feedback):
    """This module's reading of top-k with error feedback, for WORLD ranks."""
    k = max(1, math.ceil(ratio * NUMEL))
    residual = [torch.zeros(NUMEL) for _ in range(WORLD)]
    expected = []
    for local in locals_per_step:  # sparse from the first step: entries are chosen per parameter
        total = torch.zeros(NUMEL)
        for r in range(WORLD):
            corrected = local[r] + residual[r] if error_feedback else local[r].clone()
            idx = corrected.abs().topk(k).indices
            total[idx] += corrected[idx]
            if error_feedback:
                corrected[idx] = 0
                residual[r] = corrected
        expected.append(total / WORLD)
    return expected, residual


@pytest.mark.parametrize("error_feedback", [True, False])
def test_topk_replays_selection_and_error_feedback(results, error_feedback):
    outs = results[("topk", TOPK_RATIO, error_feedback)]
    expected, residual = _replay_topk(outs[0]["local"], TOPK_RATIO, error_feedback)
    for r, rank_out in enumerate(outs):
        for got, exp in zip(rank_out["got"], expected):
            torch.testing.assert_close(got, exp, atol=EXACT_TOL, rtol=EXACT_TOL)
        if error_feedback:
            torch.testing.assert_close(rank_out["residual"][0], residual[r], atol=EXACT_TOL, rtol=EXACT_TOL)
        else:
            assert rank_out["residual"] == []
    k = math.ceil(TOPK_RATIO * NUMEL)
    assert outs[0]["ratio"] == [pytest.approx(k * 8 / (NUMEL * 4))] * W.NUM_STEPS  # values + int32 indices


def test_randomk_shares_indices_and_conserves_gradient_mass(results):
    outs = results[("randomk", TOPK_RATIO, True)]
    k = math.ceil(TOPK_RATIO * NUMEL)
    for rank_out in outs:
        for got in rank_out["got"]:
            # Every rank picked the same k indices, so the average has at most k non-zeros.
            assert int((got != 0).sum()) <= k
        assert rank_out["ratio"][-1] == pytest.approx(k / NUMEL)
    # Error feedback loses nothing: what was sent plus what every rank still holds is the
    # sum of all gradients.
    sent = torch.stack(outs[0]["got"]).sum(dim=0)
    held = torch.stack([o["residual"][0] for o in outs]).mean(dim=0)
    true = torch.stack([_mean(local) for local in outs[0]["local"]]).sum(dim=0)
    torch.testing.assert_close(sent + held, true, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0]["got"][-1], outs[1]["got"][-1], atol=0, rtol=0)


def test_powersgd_rank1_is_exact_on_rank1_gradients(results):
    for rank_out in results[("powersgd", 0.1, True)]:
        for got, local in zip(rank_out["got"], rank_out["local"]):
            torch.testing.assert_close(got, _mean(local), atol=POWERSGD_TOL, rtol=POWERSGD_TOL)
        ratios = rank_out["ratio"]
        assert ratios[0] == 1.0  # plain all-reduce before start_iter
        # rank 1: P (8x1) and Q (16x1) instead of 8x16.
        assert ratios[-1] == pytest.approx((W.OUT_FEATURES + W.IN_FEATURES) / NUMEL)


@pytest.mark.parametrize("method", ["topk", "randomk"])
def test_sparse_state_resumes_exactly_under_another_bucket_grouping(run_distributed, method):
    """Entries are chosen per parameter and the memory is kept by parameter name, so a resumed
    DDP (which groups parameters into buckets afresh) continues exactly."""
    per_rank = run_distributed(W.run_resumed, WORLD, method, timeout=120)
    for out in per_rank:
        for got, expected in zip(out["resumed"], out["straight"]):
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
