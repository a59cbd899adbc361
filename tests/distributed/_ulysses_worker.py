"""Rank-side code of the hybrid (all-to-all over heads x ring) tests.

One 4-process spawn (``run_all``) holds every configuration and check: a sequence group of K=4 ranks with U in
{1, 2, 4} (U=1: the plain ring) and two sequence groups of K=2 ranks with U=2 (dp=2).
Groups are built by ``ring_lightning.sequence.groups`` exactly as RingStrategy builds them,
in the same order on every rank; each case then runs ``_ring_worker.run_split`` inside
the sharding the strategy would enter.
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

import _ring_worker as R
from ring_lightning.attention import create_ring_attention
from ring_lightning.sequence.groups import build_hybrid_groups
from ring_lightning.sequence.sharding import sequence_sharding, shard_sequence


def _groups(world: int, configs):
    """(sequence group, hybrid groups or None) per (K, U), created alike on every rank."""
    out = {}
    for sp, ulysses in sorted(configs):
        if sp == world:
            seq = dist.group.WORLD
        else:
            seq, _ = dist.new_subgroups_by_enumeration([list(range(s, s + sp)) for s in range(0, world, sp)])
        out[(sp, ulysses)] = (seq, build_hybrid_groups(world, sp, ulysses))
    return out


def _sharding(groups, layout: str):
    seq, hybrid = groups
    extra = () if hybrid is None else (hybrid.ulysses, hybrid.ring)
    return sequence_sharding(seq, layout, *extra)


def run_hybrid_cases(rank: int, world: int, cases: list) -> dict:
    """Every case on its (K, U) groups: relative errors of out/lse/dq/dk/dv, and the stats."""
    groups = _groups(world, {(c["sp"], c["U"]) for c in cases})
    results = {}
    for case in cases:
        sp = case["sp"]
        try:
            with _sharding(groups[(sp, case["U"])], case["fields"]["layout"]):
                results[case["id"]] = R.run_split(rank % sp, sp, case)
        except Exception:  # reported per case so one failure does not hide the others
            results[case["id"]] = {"error": traceback.format_exc()}
    return results


def all_to_all_bytes(rank: int, world: int, case: dict, ulysses_sizes) -> dict:
    """Bytes this rank's all-to-all sent in one forward + backward, per U, at K = world."""
    groups = _groups(world, {(world, u) for u in ulysses_sizes})
    q, k, v, grad = R.make_inputs(case)
    shard = lambda x: shard_sequence(x, world, rank, "zigzag").contiguous()
    out = {}
    for u in ulysses_sizes:
        attn = create_ring_attention("standard", layout="zigzag")
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        with _sharding(groups[(world, u)], "zigzag"):
            o = attn(ql, kl, vl, is_causal=True, already_split=True)
            o.backward(shard(grad))
        stats = attn.get_profiling_stats()
        out[u] = {key: stats[key] for key in ("all_to_all_bytes", "all_to_all_volume_mb", "ulysses_size",
                                              "comm_volume_mb", "all_to_all_time_ms")}
    return out


def heads_not_divisible(rank: int, world: int) -> str:
    """H=3 under U=2: a ValueError naming strategy.ulysses_size on every rank, no hang."""
    groups = _groups(world, {(world, 2)})
    attn = create_ring_attention("standard", comm_timeout_s=20)
    q = torch.randn(1, 8, 3, 4)
    try:
        with _sharding(groups[(world, 2)], "contiguous"):
            attn(q, q, q, already_split=True)
    except ValueError as exc:
        return str(exc)
    return ""


def run_all(rank: int, world: int, cases: list, byte_cases: list, ulysses_sizes) -> dict:
    """Everything above in one spawn (spawning is the slow part)."""
    return {"parity": run_hybrid_cases(rank, world, cases),
            "bytes": [all_to_all_bytes(rank, world, c, ulysses_sizes) for c in byte_cases],
            "heads_error": heads_not_divisible(rank, world)}



def silent_peer(rank: int, world: int):
    """``_ring_worker.silent_peer`` inside the all-to-all over heads (U = world)."""
    groups = _groups(world, {(world, world)})  # collective: before rank 1 goes silent
    return R.silent_peer(rank, world, "standard", lambda: _sharding(groups[(world, world)], "contiguous"))
