"""Ulysses x ring: an all-to-all over heads in front of the ring (DeepSpeed-Ulysses, USP).

Inside a hybrid shard context (``SequenceSharding.ulysses_group`` set; docs/ARCHITECTURE.md,
"Hybrid sequence parallelism") each of the K ranks of a sequence group holds its K-way
shard of the sequence for all H heads. One all-to-all over the U ranks of its all-to-all
group trades that for the ring group's (K/U-way) shard of the sequence for H/U heads;
the ring (base.py ``_ring_entry``, ring.py) then runs unchanged over the K/U ranks of the ring group on
those heads, and the inverse all-to-all brings the output home. U = K is pure Ulysses
(a ring of one rank: one local kernel over the whole sequence).

What makes that exact:

* Order. The U shards of an all-to-all group hold exactly the ring rank's shard of the
  same layout over K/U ranks (zigzag too), in another order; the receive side copies
  each chunk straight to its place in the ring's local order
  (``sharding.all_to_all_chunk_order``), so positions, causality and the ring's plan see
  a ring-layout shard. ``document_ids`` are all-gathered over the group the same way.
* Heads. Rank ``u`` holds query heads ``[u H/U, (u+1) H/U)``; the ring call gets
  ``head_offset = u H/U`` so dilation offsets follow the GLOBAL head index (plan.py).
* Grouped-query attention. When U divides the kv heads K, rank ``u`` gets kv heads
  ``[u K/U, (u+1) K/U)``. Otherwise each kv head is replicated ``U / gcd(K, U)`` times
  (``lcm(K, U)`` slots, so every rank keeps a uniform query-per-kv group) inside the one
  copy that builds the send buffer; in backward the replicas' gradients add up in float32.
* Backward. The gradient of an all-to-all is the inverse all-to-all (autograd Functions
  below), with the same chunk order.

Copies: the send buffer is built by one gather (heads to destinations, replication
included) and the receive buffer is copied once into the ring's layout: the layout change
itself, nothing more. Bytes sent and time are in ``get_profiling_stats()`` (``all_to_all_*``).

Letters: B batch, T local length (N/K), U all-to-all size, n pieces per shard (1
contiguous, 2 zigzag), P piece length (T/n), H query heads, K kv heads, h heads per rank
after the exchange, D head dim.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..sequence.sharding import all_to_all_chunk_order, check_divisible, rank_pieces
from .agreement import call_signature, verify_across_ranks
from .comm import RingCommunicationError, communication_error
from .documents import LastTensorCache
from .profiling import RingProfiler


class UlyssesComm:
    """One rank's all-to-all group: its size, this rank's place, exchanges with a timeout.

    Also what ``agreement.verify_across_ranks`` needs (group, world, rank,
    backend, timeout, error), so the group's ranks are checked for agreeing inputs once.
    """

    def __init__(self, group: dist.ProcessGroup, timeout_s: float) -> None:
        self.group, self.timeout_s = group, timeout_s
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.backend = dist.get_backend(group)

    def error(self, peers, step, exc) -> RingCommunicationError:
        names = ", ".join(str(dist.get_global_rank(self.group, p)) for p in sorted(set(peers)))
        return communication_error("the all-to-all over heads", names, self.timeout_s, exc)

    def _wait(self, work) -> None:
        try:  # gloo: block with the timeout; NCCL: order the compute stream after the exchange
            ok = work.wait(timeout=self.timeout) if self.backend != "nccl" else work.wait()
        except Exception as exc:
            raise self.error([r for r in range(self.world) if r != self.rank], 0, exc) from exc
        if ok is False:
            raise self.error([r for r in range(self.world) if r != self.rank], 0, None)

    def all_to_all(self, send: torch.Tensor, profiler: RingProfiler) -> torch.Tensor:
        """Block ``j`` of ``send`` (dim 0 in U equal blocks) goes to rank ``j``; block ``i`` of the
        result came from rank ``i``. The block a rank keeps never leaves it: not counted."""
        recv = torch.empty_like(send)
        self._wait(dist.all_to_all_single(recv, send, group=self.group, async_op=True))
        profiler.all_to_all_bytes += send.numel() * send.element_size() * (self.world - 1) // self.world
        return recv

    def all_gather(self, x: torch.Tensor) -> List[torch.Tensor]:
        shards = [torch.empty_like(x) for _ in range(self.world)]
        self._wait(dist.all_gather(shards, x.contiguous(), group=self.group, async_op=True))
        return shards


class Exchange:
    """One call's all-to-all: the group, where each received chunk goes, where figures go."""

    def __init__(self, comm: UlyssesComm, order: Tuple[Tuple[int, int], ...], pieces: int,
                 profiler: RingProfiler) -> None:
        self.comm, self.order, self.pieces, self.profiler = comm, order, pieces, profiler
        # (first ring chunk, first source rank, piece, count): chunks from consecutive ranks' same
        # piece land side by side (all of contiguous; zigzag's first halves), so one copy each
        self.runs: List[Tuple[int, int, int, int]] = []
        for t, (u, i) in enumerate(order):
            last = self.runs[-1] if self.runs else None
            if last is not None and last[2] == i and last[1] + last[3] == u:
                self.runs[-1] = (last[0], last[1], i, last[3] + 1)
            else:
                self.runs.append((t, u, i, 1))


def sequence_to_heads(x: torch.Tensor, ex: Exchange, heads: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, T, Hx, D) this rank's shard, all heads -> (B, U*T, h, D) the ring's shard, this rank's heads.

    ``heads``: the (U*h,) head each destination slot holds (kv replication), None: all, in order.
    """
    B, T, Hx, D = x.shape
    U, n = ex.comm.world, ex.pieces
    P = T // n
    index = torch.arange(Hx, device=x.device) if heads is None else heads
    h = index.numel() // U
    with ex.profiler.all_to_all.span():
        # (B, T, Hx, D) -> (Hx, n, B, P, D) view -> (U*h, n, B, P, D) destination-major: the one gather
        send = x.reshape(B, n, P, Hx, D).permute(3, 1, 0, 2, 4).index_select(0, index)
        recv = ex.comm.all_to_all(send, ex.profiler).view(U, h, n, B, P, D)  # source-major
        out = x.new_empty(B, U * n, P, h, D)
        for t, u, i, c in ex.runs:  # (c, h, B, P, D) -> (B, c, P, h, D), in the ring's order
            out[:, t:t + c].copy_(recv[u:u + c, :, i].permute(2, 0, 3, 1, 4))
    return out.view(B, U * n * P, h, D)


def heads_to_sequence(y: torch.Tensor, ex: Exchange, heads: Optional[torch.Tensor], num_heads: int) -> torch.Tensor:
    """Inverse of :func:`sequence_to_heads`: (B, U*T, h, D) -> (B, T, num_heads, D); slots that
    replicate one head (``heads``) add up, in float32 at least (the adjoint of the replication)."""
    B, Tr, h, D = y.shape
    U, n = ex.comm.world, ex.pieces
    P = Tr // (U * n)
    with ex.profiler.all_to_all.span():
        chunks = y.reshape(B, U * n, P, h, D)
        send = y.new_empty(U, h, n, B, P, D)  # destination-major
        for t, u, i, c in ex.runs:  # (B, c, P, h, D) -> (c, h, B, P, D)
            send[u:u + c, :, i].copy_(chunks[:, t:t + c].permute(1, 3, 0, 2, 4))
        recv = ex.comm.all_to_all(send.view(U * h, n, B, P, D), ex.profiler)  # source j: heads j*h..
        src = recv.permute(2, 1, 3, 0, 4)  # (B, n, P, U*h, D) view
        if heads is None:
            out = y.new_empty(B, n, P, U * h, D).copy_(src)
        else:
            acc = torch.promote_types(y.dtype, torch.float32)
            out = torch.zeros(B, n, P, num_heads, D, dtype=acc, device=y.device)
            out = out.index_add_(3, heads, src.to(acc)).to(y.dtype)
    return out.view(B, n * P, num_heads, D)


class _SequenceToHeads(torch.autograd.Function):
    @staticmethod
    def forward(fctx, x, ex: Exchange, heads: Optional[torch.Tensor]):
        fctx.ex, fctx.heads, fctx.num_heads = ex, heads, x.shape[2]
        return sequence_to_heads(x, ex, heads)

    @staticmethod
    def backward(fctx, grad):
        return heads_to_sequence(grad, fctx.ex, fctx.heads, fctx.num_heads), None, None


class _HeadsToSequence(torch.autograd.Function):
    @staticmethod
    def forward(fctx, y, ex: Exchange):
        fctx.ex = ex
        return heads_to_sequence(y, ex, None, y.shape[2] * ex.comm.world)

    @staticmethod
    def backward(fctx, grad):
        return sequence_to_heads(grad, fctx.ex, None), None


def check_heads(num_heads: int, ulysses_size: int, sp: int) -> None:
    if num_heads % ulysses_size != 0:
        valid = [u for u in range(1, sp + 1) if sp % u == 0 and num_heads % u == 0]
        raise ValueError(
            f"strategy.ulysses_size={ulysses_size} must divide the number of attention heads ({num_heads}): "
            f"each rank of an all-to-all group attends H/U of them. Valid values with "
            f"sequence_parallel_size={sp} and {num_heads} heads: {valid}"
        )


def kv_head_index(num_kv_heads: int, ulysses_size: int, device) -> Optional[torch.Tensor]:
    """The kv head in each of the ``lcm(K, U)`` slots when U does not divide K (None when it does):
    every head ``U / gcd(K, U)`` times in a row, so slot ``s`` serves query heads ``s * H / lcm``..."""
    if num_kv_heads % ulysses_size == 0:
        return None
    copies = ulysses_size // math.gcd(num_kv_heads, ulysses_size)
    return torch.arange(num_kv_heads * copies, device=device) // copies


_comm: Optional[UlyssesComm] = None  # the layers of a model share one group
_ring_ids = LastTensorCache()  # the ring's document ids of the step's ids tensor


def _comm_for(group: dist.ProcessGroup, timeout_s: float) -> UlyssesComm:
    global _comm
    if _comm is None or _comm.group is not group or _comm.timeout_s != timeout_s:
        _comm = UlyssesComm(group, timeout_s)
    return _comm


def _ring_document_ids(ids: torch.Tensor, ex: Exchange) -> torch.Tensor:
    """(B, T) ids of this rank's shard -> (B, U*T) ids of the ring's shard (all-gathered, reordered)."""
    key = (id(ex.comm.group), ex.order)
    ring_ids = _ring_ids.get(ids, key)
    if ring_ids is None:
        shards = ex.comm.all_gather(ids)
        P = ids.shape[1] // ex.pieces
        ring_ids = _ring_ids.put(ids, key, torch.cat([shards[u].narrow(1, i * P, P) for u, i in ex.order], 1))
    return ring_ids


def ulysses_attention(attn, q, k, v, call, document_ids: Optional[torch.Tensor]):
    """``attn``'s forward under a hybrid sharding (``call.sharding``, route.Route.HYBRID): all-to-all,
    the ring on h heads (``attn._ring_entry``, told its head offset), inverse all-to-all.

    Raises:
        ValueError: U does not divide the heads (naming ``strategy.ulysses_size``); what the
            ring raises for its inputs.
    """
    active = call.sharding
    comm = _comm_for(active.ulysses_group, attn.config.comm_timeout_s)
    sp, U, H = call.world, comm.world, q.shape[2]
    check_heads(H, U, sp)
    ring_rank, layout = dist.get_rank(active.ring_group), active.layout
    # sequence_groups.hybrid_rank_lists: sequence-group rank s is ring position s // U, all-to-all position s % U
    assert call.rank == ring_rank * U + comm.rank, "hybrid groups out of order"
    seq_len = call.seq_len
    check_divisible(seq_len, sp, layout)
    described = dataclasses.replace(call, patterns=tuple(attn.config.patterns(seq_len)),
                                    masks=attn.mask_kinds(q, seq_len, document_ids))
    verify_across_ranks(comm, call_signature(described, attn.variant, attn.config), q.device, attn._verified)
    attn._start_profile(q.device)  # the ring call inside adds to these figures
    prof = attn.profiler
    prof.ulysses_size = U
    ex = Exchange(comm, all_to_all_chunk_order(seq_len, sp, U, ring_rank, layout),
                  len(rank_pieces(seq_len, sp, 0, layout)), prof)
    kv_heads = kv_head_index(k.shape[2], U, q.device)
    q_r = _SequenceToHeads.apply(q, ex, None)  # (B, U*T, H/U, D)
    k_r, v_r = (_SequenceToHeads.apply(x, ex, kv_heads) for x in (k, v))  # (B, U*T, lcm(K, U)/U or K/U, D)
    ids_r = None if document_ids is None else _ring_document_ids(document_ids, ex)
    res = attn._ring_entry(q_r, k_r, v_r, group=active.ring_group, layout=layout, head_offset=comm.rank * (H // U),
                           is_causal=call.is_causal, return_lse=call.return_lse, document_ids=ids_r)
    out = _HeadsToSequence.apply(res[0] if call.return_lse else res, ex)  # (B, T, H, D)
    if not call.return_lse:
        return out
    return out, _HeadsToSequence.apply(res[1].unsqueeze(-1), ex).squeeze(-1)  # (B, T, H), float32
