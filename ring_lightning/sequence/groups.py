"""How RingStrategy's ranks form groups: sequence groups, and inside them the hybrid's groups.

The world is ``dp x sp`` ranks; ``sp = sequence_parallel_size`` consecutive ranks hold one
sample (a *sequence group*). With ``ulysses_size = U`` a sequence group of K ranks is split
two ways (docs/ARCHITECTURE.md, "Hybrid sequence parallelism"):

* U consecutive ranks form an *all-to-all group*: they trade their sequence shards of all
  heads for a U times longer shard of H/U heads (DeepSpeed-Ulysses). Consecutive ranks sit
  on one node, so the all-to-all stays on the fast links inside it.
* The K/U ranks at stride U form a *ring group*: after the all-to-all the ring runs over
  them, unchanged, on H/U heads, and may cross nodes.

Rank ``s`` of a sequence group is ring position ``s // U`` and all-to-all position ``s % U``.
``U = 1`` is the plain ring (no groups are built); ``U = K`` is pure Ulysses (rings of one).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch.distributed as dist

from .dims import ParallelDims, check_ulysses_size, check_world_size, divisors  # noqa: F401 (their old home)


def hybrid_rank_lists(world_size: int, sp: int, ulysses_size: int) -> Tuple[List[List[int]], List[List[int]]]:
    """(all-to-all groups, ring groups) as lists of global ranks, every sequence group's."""
    ring = ParallelDims(world_size, sp, ulysses_size).ring  # validates the three sizes
    ulysses_lists, ring_lists = [], []
    for first in range(0, world_size, sp):  # sequence group [first, first + sp)
        ulysses_lists += [[first + r * ulysses_size + u for u in range(ulysses_size)] for r in range(ring)]
        ring_lists += [[first + r * ulysses_size + u for r in range(ring)] for u in range(ulysses_size)]
    return ulysses_lists, ring_lists


@dataclass(frozen=True)
class HybridGroups:
    """This rank's all-to-all group (U ranks) and ring group (K/U ranks)."""

    ulysses: dist.ProcessGroup
    ring: dist.ProcessGroup


def build_hybrid_groups(world_size: int, sp: int, ulysses_size: int) -> Optional[HybridGroups]:
    """Create the hybrid's process groups (collective: every rank calls it alike); None for U = 1."""
    if ulysses_size == 1:
        return None
    ulysses_lists, ring_lists = hybrid_rank_lists(world_size, sp, ulysses_size)
    # new_subgroups_by_enumeration creates every listed group on every rank, in order, and
    # returns the one holding this rank.
    ulysses, _ = dist.new_subgroups_by_enumeration(ulysses_lists)
    ring, _ = dist.new_subgroups_by_enumeration(ring_lists)
    return HybridGroups(ulysses, ring)
