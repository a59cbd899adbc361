"""Every rank of a group must call the attention alike: checked once per input signature.

One all_gather of hashes of the call's signature (shapes, dtype, layout, causality, the
config fields that change the maths); a difference raises on every rank, naming the fields.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

from .route import AttentionCall

NAMES = ("shape q", "shape k", "dtype", "layout", "is_causal", "already_split", "variant",
         "patterns", "block_size", "sparsity_ratio", "sparse_pattern", "sparse_seed",
         "custom_ring_order", "async_ring_communication", "scale", "dropout", "document_ids given", "grid")


def _stable_hash(x) -> int:
    """Same value in every process (Python's str hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(x).encode(), digest_size=7).digest(), "little")


def call_signature(call: AttentionCall, variant: str, cfg) -> tuple:
    """What must agree across the ranks of one call, in the order of ``NAMES``."""
    return (call.q_shape, call.k_shape, str(call.dtype), call.layout, call.is_causal, call.already_split,
            variant, call.patterns, cfg.block_size, cfg.sparsity_ratio, cfg.sparse_pattern, cfg.sparse_seed,
            tuple(cfg.custom_ring_order or ()), cfg.async_ring_communication, cfg.scale, cfg.dropout,
            "documents" in call.masks,
            (tuple(cfg.grid_shape or ()), tuple(cfg.grid_window or ()), cfg.grid_order))


def verify_across_ranks(comm, sig: tuple, device: torch.device, verified: set) -> None:
    """Raise ValueError on every rank if the ranks of ``comm``'s group disagree on ``sig``
    (once per signature: ``verified`` remembers the checked ones). ``comm``: a RingComm or
    ulysses.UlyssesComm (group, world, rank, backend, timeout, error)."""
    if sig in verified:
        return
    codes = torch.tensor([_stable_hash(x) for x in sig], dtype=torch.int64,
                         device=device if comm.backend == "nccl" else "cpu")
    gathered = [torch.empty_like(codes) for _ in range(comm.world)]
    work = dist.all_gather(gathered, codes, group=comm.group, async_op=True)
    try:
        work.wait(timeout=comm.timeout) if comm.backend != "nccl" else work.wait()
    except Exception as exc:
        raise comm.error([r for r in range(comm.world) if r != comm.rank], 0, exc) from exc
    mine = codes.tolist()
    for r, other in enumerate(gathered):
        diff = [n for n, a, b in zip(NAMES, mine, other.tolist()) if a != b]
        if diff:
            raise ValueError(
                f"rank {comm.rank} and rank {r} of the sequence-parallel group called ring attention "
                f"with different {', '.join(diff)} (this rank: {[sig[NAMES.index(d)] for d in diff]}). "
                f"Every rank must pass shards of the same length and use the same config."
            )
    verified.add(sig)
