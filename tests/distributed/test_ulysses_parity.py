"""Hybrid sequence parallelism (all-to-all over heads x ring) equals the float64 reference.

K=4 with U in {1, 2, 4} (U=1: the plain ring; U=4: pure Ulysses) and K=2 with U=2 (two
sequence groups, dp=2), all from ONE 4-process spawn: outputs, lse and dq/dk/dv on every
rank, dense and dilated (dilation offsets follow the global head index: with H/U=1 every
rank's one head has its own offset), causal, GQA with U dividing the kv heads and not
(replicated kv heads), both layouts, packed documents, every variant, and hilbert's token grids.
"""

from __future__ import annotations

import itertools

import pytest

import conftest
import _ring_worker as R
import _ulysses_worker as worker

pytestmark = pytest.mark.distributed

FLOAT32_REL_TOL = 1e-5  # as test_ring_parity: float32 inputs and accumulation, errors near 1e-7
WORLD, SEQ = 4, 64
CONFIGS = ((4, 1), (4, 2), (4, 4), (2, 2))  # (K = sequence_parallel_size, U = ulysses_size)
PATTERNS = {"dense": {}, "dilated": dict(segment_lengths=[8, 16, SEQ], dilation_rates=[1, 2, 4])}
GRID = dict(grid_shape=[8, 8], grid_window=[1, 2], grid_order="hilbert", compute_block_size=4)  # hilbert's grids
HEADS = ((4, 2), (4, 1))  # (H, kv heads): U | K for U <= 2, replicated kv heads otherwise


def _case(sp, u, name, fields, causal, layout, heads, variant="standard", docs=None):
    cid = f"K{sp}U{u}-{variant}-{name}-{'causal' if causal else 'full'}-{layout}-H{heads[0]}K{heads[1]}"
    cid += f"-docs_{docs}" if docs else ""
    extra = {"block_sparse": dict(block_size=8, sparsity_ratio=0.5, sparse_pattern="random", sparse_seed=3),
             "hilbert": {} if "grid_shape" in fields else dict(hilbert_curve_level=3)}.get(variant, {})
    return dict(id=cid, sp=sp, U=u, B=2, N=SEQ, H=heads[0], K=heads[1], D=4, causal=causal, split=True,
                variant=variant, docs=docs, fields={"layout": layout, **fields, **extra})


def build_cases():
    cases = []
    for (sp, u), (name, fields), causal, layout, heads in itertools.product(
            CONFIGS, PATTERNS.items(), (False, True), ("contiguous", "zigzag"), HEADS):
        cases.append(_case(sp, u, name, fields, causal, layout, heads))
    for sp, u in CONFIGS:
        for layout in ("contiguous", "zigzag"):
            cases.append(_case(sp, u, "dense", {}, True, layout, (4, 2), docs="packed"))
        cases.append(_case(sp, u, "dilated", PATTERNS["dilated"], True, "zigzag", (4, 1), docs="unpacked"))
        for variant in ("hilbert", "block_sparse", "distributed"):
            cases.append(_case(sp, u, "dense", {}, True, "zigzag", (4, 2), variant=variant))
        cases.append(_case(sp, u, "grid8x8", GRID, True, "zigzag", (4, 2), variant="hilbert"))
    return cases


CASES = build_cases()
BYTE_CASES = [dict(B=2, N=32, H=4, K=kv_heads, D=8, seed=3) for kv_heads in (4, 2)]  # U | K, and not
ULYSSES_SIZES = (1, 2, 4)
_cache = {}


def results():
    if "all" not in _cache:
        _cache["all"] = conftest.run_distributed(worker.run_all, WORLD, CASES, BYTE_CASES, ULYSSES_SIZES,
                                                 timeout=600)
    return _cache["all"]


@pytest.mark.parametrize("case_id", [c["id"] for c in CASES])
def test_hybrid_matches_reference_outputs_lse_and_grads(case_id):
    for rank, res in enumerate(results()):
        r = res["parity"][case_id]
        assert "error" not in r, f"rank {rank}:\n{r.get('error')}"
        for key in ("out", "lse", "dq", "dk", "dv"):
            assert r[key] <= FLOAT32_REL_TOL, f"rank {rank} {key}: relative error {r[key]:.3g}"


def test_the_all_to_all_runs_only_with_ulysses_and_pure_ulysses_needs_no_ring():
    for rank, res in enumerate(results()):
        for case in CASES:
            stats = res["parity"][case["id"]]["stats"]
            assert stats["ulysses_size"] == case["U"], case["id"]
            assert (stats["all_to_all_bytes"] > 0) == (case["U"] > 1), case["id"]
            if case["U"] == case["sp"] and case["variant"] == "standard":
                assert stats["comm_volume_mb"] == 0 and stats["ring_steps"] == 0, case["id"]


def _all_to_all_formula(case, sp, u, itemsize=4) -> int:
    """Bytes one rank sends in forward + backward: q, k, v and the output forward, their
    gradients backward, each (U-1)/U of its (B, N/K, heads, D) tensor; kv heads count their
    replicas (lcm(K, U) slots when U does not divide K)."""
    import math
    kv = case["K"] if case["K"] % u == 0 else math.lcm(case["K"], u)
    per_head = case["B"] * (case["N"] // sp) * case["D"] * itemsize
    return 2 * (2 * case["H"] + 2 * kv) * per_head * (u - 1) // u


@pytest.mark.parametrize("which", range(len(BYTE_CASES)), ids=[f"kv{c['K']}" for c in BYTE_CASES])
def test_all_to_all_bytes_per_rank_follow_the_formula(which):
    case = BYTE_CASES[which]
    for res in results():
        stats = res["bytes"][which]
        for u in ULYSSES_SIZES:
            expected = _all_to_all_formula(case, WORLD, u)
            assert stats[u]["all_to_all_bytes"] == expected, (u, stats[u], expected)
            assert stats[u]["all_to_all_volume_mb"] == pytest.approx(expected / 2**20)
            assert stats[u]["ulysses_size"] == u
        assert stats[1]["all_to_all_bytes"] == 0 and stats[1]["all_to_all_time_ms"] == 0
        assert stats[4]["comm_volume_mb"] == 0  # pure Ulysses: the ring has one rank
        # the ring moves less as U grows: its K/V travel among K/U ranks, for H/U heads
        assert stats[2]["comm_volume_mb"] < stats[1]["comm_volume_mb"]


def test_heads_not_divisible_by_ulysses_size_name_the_field_and_valid_values():
    for res in results():
        msg = res["heads_error"]
        assert "strategy.ulysses_size=2" in msg and "(3)" in msg and "[1]" in msg, msg


def test_silent_peer_in_the_all_to_all_raises_naming_it_within_timeout():
    name, msg, elapsed = conftest.run_distributed(worker.silent_peer, 2, timeout=120)[0]
    assert name == "RingCommunicationError" and "all-to-all over heads with rank(s) 1" in msg, msg
    assert elapsed < 10
