"""Unit tier: the hybrid's group arithmetic, the chunk order after the all-to-all, head offsets.

No process group: the rank lists, the layouts and the plan are pure functions.
"""

from __future__ import annotations

import pytest
import torch

from ring_lightning.attention.plan import RingPlan
from ring_lightning.attention.ulysses import kv_head_index
from ring_lightning.sequence.groups import check_ulysses_size, hybrid_rank_lists
from ring_lightning.sequence.sharding import LAYOUTS, all_to_all_chunk_order, rank_pieces, sequence_positions
from ring_lightning.parallel.strategy import RingStrategy


def test_all_to_all_groups_are_consecutive_ranks_and_rings_stride_u():
    ulysses, ring = hybrid_rank_lists(world_size=16, sp=8, ulysses_size=4)
    assert ulysses == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert ring == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert hybrid_rank_lists(4, 4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])  # pure Ulysses
    assert hybrid_rank_lists(4, 4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])  # the plain ring


@pytest.mark.parametrize("sp, ulysses, match", [
    (4, 3, r"strategy.ulysses_size=3 must divide strategy.sequence_parallel_size=4.*\[1, 2, 4\]"),
    (8, 0, r"strategy.ulysses_size must be an int >= 1"),
    (2, 2.0, r"strategy.ulysses_size must be an int >= 1"),
])
def test_ulysses_size_not_dividing_sp_is_refused_at_strategy_construction(sp, ulysses, match):
    with pytest.raises(ValueError, match=match):
        RingStrategy(sequence_parallel_size=sp, ulysses_size=ulysses)
    with pytest.raises(ValueError, match=match):
        check_ulysses_size(ulysses, sp)


def test_ulysses_size_with_auto_sp_is_checked_once_sp_is_known():
    check_ulysses_size(3, "auto")  # the devices per node are not known yet: setup_distributed checks
    assert RingStrategy(ulysses_size=2).ulysses_size == 2


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sp, ulysses", [(4, 2), (4, 4), (8, 2), (8, 4), (2, 2), (4, 1)])
def test_chunks_after_the_all_to_all_are_the_ring_layouts_shard_in_order(layout, sp, ulysses):
    """The U shards of an all-to-all group, reordered, are exactly the ring rank's shard of
    the same layout over sp/U ranks: positions in the ring's local order."""
    N = 8 * sp
    chunk = rank_pieces(N, sp, 0, layout)[0].length
    for r in range(sp // ulysses):
        got = []
        for u, i in all_to_all_chunk_order(N, sp, ulysses, r, layout):
            p = rank_pieces(N, sp, r * ulysses + u, layout)[i]
            got += list(range(p.start, p.start + p.length))
        assert len(got) == N // (sp // ulysses) and len(got) % chunk == 0
        assert got == sequence_positions(N, sp // ulysses, r, layout).tolist()


def test_zigzag_chunks_arrive_in_another_order_than_ranks():
    # K=4, U=2, ring rank 0: ranks 0, 1 hold chunks (0, 7) and (1, 6) of 8; the ring's zigzag
    # shard over 2 ranks is chunks 0, 1, 6, 7: rank 1's second piece comes before rank 0's.
    assert all_to_all_chunk_order(64, 4, 2, 0, "zigzag") == ((0, 0), (1, 0), (1, 1), (0, 1))
    assert all_to_all_chunk_order(64, 4, 2, 1, "contiguous") == ((0, 0), (1, 0))


def test_plan_without_head_offset_selects_heads_as_before():
    plan = RingPlan(64, 2, "zigzag", [(16, 1), (64, 4)], True, 8, 2)
    for pat in plan.patterns:
        for o in plan.offsets(pat):
            assert plan.q_heads(pat, o) == slice(o, None, pat.dilation)


@pytest.mark.parametrize("head_offset, num_heads, kv", [(1, 1, 1), (2, 2, 1), (3, 1, 1), (6, 2, 2)])
def test_plan_head_offset_gives_each_local_head_its_global_offset(head_offset, num_heads, kv):
    plan = RingPlan(64, 2, "contiguous", [(16, 1), (64, 4)], False, num_heads, kv, head_offset=head_offset)
    for pat in plan.patterns:
        seen = []
        for o in plan.offsets(pat):
            heads = list(range(num_heads))[plan.q_heads(pat, o)]
            assert heads and all((j + head_offset) % pat.dilation == o for j in heads)
            seen += heads
        assert sorted(seen) == list(range(num_heads))  # every local head in exactly one offset


@pytest.mark.parametrize("kv, u, expected", [
    (4, 2, None), (2, 2, None), (2, 4, [0, 0, 1, 1]), (1, 4, [0, 0, 0, 0]), (3, 2, [0, 0, 1, 1, 2, 2]),
])
def test_kv_heads_are_replicated_to_lcm_slots_only_when_u_does_not_divide_them(kv, u, expected):
    index = kv_head_index(kv, u, "cpu")
    assert (index is None and expected is None) or index.tolist() == expected
    if index is not None:
        # every rank's slots serve a uniform group of its H/U query heads: H = lcm(kv, u) * g
        H = 2 * len(expected)
        group = H // len(expected)
        for h in range(H):  # query head h sits in slot h // group, which holds kv head h // (H // kv)
            assert index[h // group].item() == h // (H // kv)
