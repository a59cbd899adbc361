"""The ring autograd Function: forward sends K/V around, backward sends dK/dV home.

Forward on rank ``me`` (group size W): step 0 computes every task whose keys are local;
step s >= 1 computes the tasks whose keys come from ``partners(s)[0]``. Step s+1's
transfer is posted before step s's compute so the two overlap (double buffering: each
step has its own K and V receive buffers). Each task's ``(out, lse)`` merges into ONE
float32 accumulator per query -- patterns and ring steps alike (merge.py).

Backward replays the schedule: the same K/V arrive again (recomputed transfer instead of
stored, so memory stays O(N/W)), each task yields dQ for local queries and dK/dV for the
sender's keys, and those go straight back to their owner in float32 so that rounding
does not grow with W.

Letters: B batch, T local length, H query heads, K kv heads, D head dim,
S segments in a task (1 for spanning patterns), M/L query/key tokens of a task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .comm import BufferPool, RingComm, RingTransfers
from .kernels import BlockSpec, block_backward, block_forward
from .merge import accumulator_dtype, merge_
from .plan import CAUSAL, Item, RingPlan, Task
from .views import add_to_kv, expand_heads, kv_view, q_view, reduce_heads
from .profiling import RingProfiler
from .sparse_kernel import aligned, build_layout, sparse_backward, sparse_forward

MaskFn = Callable[[torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


@dataclass
class RingContext:
    """Everything one call of the ring needs besides the tensors."""

    plan: RingPlan
    comm: Optional[RingComm]
    scale: float
    profiler: RingProfiler
    pool: BufferPool
    kernel: str = "auto"
    tile: int = 1024
    dropout_p: float = 0.0
    dropout_seed: int = 0
    compute_dtype: Optional[torch.dtype] = None  #: mixed precision: blocks in this dtype
    async_comm: bool = True
    sync_profiling: bool = False
    profile_communication: bool = False
    #: block-sparse: (q positions (S, M), k positions (S, L)) -> token mask (S, M, L) or None = all
    mask_fn: Optional[MaskFn] = None
    #: block-sparse fast path: (block mask (N/bs, N/bs) on the device, bs)
    sparse_blocks: Optional[Tuple[torch.Tensor, int]] = None
    #: hilbert: positions (S, M) -> processing order (M,) of a task's tokens
    order_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    #: gradient check run on dq/dk/dv before they leave backward (distributed variant)
    grad_check: Optional[Callable[[str, torch.Tensor], None]] = None
    device: torch.device = torch.device("cpu")
    _masks: Dict[tuple, object] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.comm.rank if self.comm is not None else 0

    @property
    def world(self) -> int:
        return self.comm.world if self.comm is not None else 1

    def transfers(self, batch: int, head_dim: int) -> RingTransfers:
        return RingTransfers(self.comm, self.plan, self.pool, self.profiler, batch, head_dim, self.device,
                             self.sync_profiling, self.profile_communication)


# ------------------------------------------------------------------------------ helpers
def _spec(ctx: RingContext, task: Task, src: int) -> Optional[BlockSpec]:
    """Kernel spec of a task; None when its token mask keeps nothing (skip)."""
    token_mask = None
    if ctx.mask_fn is not None:
        key = (task, src)
        if key not in ctx._masks:
            qpos = ctx.plan.positions(ctx.rank, task.q_piece, task.pattern, task.offset)
            kpos = ctx.plan.positions(src, task.k_piece, task.pattern, task.offset)
            ctx._masks[key] = ctx.mask_fn(qpos, kpos)
        token_mask = ctx._masks[key]
        if token_mask is False:
            return None
    seed = hash((ctx.dropout_seed, task.pattern.index, task.offset,
                 ctx.plan.pieces[ctx.rank][task.q_piece].start,
                 ctx.plan.pieces[src][task.k_piece].start)) % (2**62)
    return BlockSpec(task.kind == CAUSAL, token_mask, ctx.dropout_p, seed)


def _batched_mask(spec: BlockSpec, batch: int, device) -> BlockSpec:
    """A per-segment tile mask (S, mq, mk) -> (B*S, 1, mq, mk), broadcast over heads."""
    fn = spec.token_mask
    if not getattr(fn, "per_segment", False):
        return spec

    def batched(q0, q1, k0, k1):
        tm = fn(q0, q1, k0, k1).to(device)  # (S, mq, mk)
        return tm.unsqueeze(0).expand(batch, *tm.shape).flatten(0, 1).unsqueeze(1)

    return BlockSpec(spec.causal, batched, spec.dropout_p, spec.dropout_seed)


def _order(ctx: RingContext, task: Task, src: int, spec: BlockSpec):
    """Hilbert variant: (query order, key order, spec with the causal mask made explicit).

    The task's tokens are permuted; the causal mask is rebuilt from the ORIGINAL positions
    of the permuted tokens (segment 0's relative positions serve every segment of a task).
    """
    qpos = ctx.plan.positions(ctx.rank, task.q_piece, task.pattern, task.offset)[0]
    kpos = ctx.plan.positions(src, task.k_piece, task.pattern, task.offset)[0]
    qo, ko = ctx.order_fn(qpos), ctx.order_fn(kpos)
    if spec.causal:
        qp, kp = qpos[qo].to(ctx.device), kpos[ko].to(ctx.device)  # positions in processing order

        def causal_tile(q0, q1, k0, k1):
            return kp[None, k0:k1] <= qp[q0:q1, None]  # (mq, mk)

        spec = BlockSpec(False, causal_tile, spec.dropout_p, spec.dropout_seed)
    return qo, ko, spec


def _sparse_layout(ctx: RingContext, task: Task, src: int, batch: int, heads: int, head_dim: int, spec):
    """Block-sparse fast path layout for a task, or None where the portable path must run
    (dilated selection, blocks not aligned with pieces, dropout)."""
    if ctx.sparse_blocks is None or task.pattern.dilation != 1 or spec.dropout_p > 0:
        return None
    key = ("layout", task, src, batch, heads, head_dim)
    if key not in ctx._masks:
        blocks, bs = ctx.sparse_blocks
        qpos = ctx.plan.positions(ctx.rank, task.q_piece, task.pattern, task.offset)
        kpos = ctx.plan.positions(src, task.k_piece, task.pattern, task.offset)
        ctx._masks[key] = (build_layout(blocks, qpos, kpos, bs, batch, task.kind == CAUSAL, heads, head_dim)
                           if aligned(qpos, kpos, bs) else None)
    return ctx._masks[key]


def _cast(ctx: RingContext, x: torch.Tensor) -> torch.Tensor:
    return x.to(ctx.compute_dtype) if ctx.compute_dtype is not None else x


def _lookup(got):
    """Task -> the received (K, V) slices its keys come from."""
    return lambda task: got[task.item]


# ---------------------------------------------------------------------------- forward
def _forward_tasks(ctx, tasks, src, q, kv_of, out, lse, saved):
    B, _, _, D = q.shape
    # (pattern, offset, piece, piece) blocks that the plan dropped as empty by construction
    ctx.profiler.skipped_blocks += ctx.plan.num_candidate_blocks(ctx.rank, src) - len(tasks)
    with ctx.profiler.compute.span():
        for task in tasks:
            spec = _spec(ctx, task, src)
            if spec is None:
                ctx.profiler.skipped_blocks += 1
                saved.append(None)
                continue
            ks, vs = kv_of(task)  # (B, S, L, Kn, D)
            qv = q_view(ctx.plan, q, ctx.rank, task)  # (B, S, M, Hs, D)
            S, M, Hs = qv.shape[1], qv.shape[2], qv.shape[3]
            q_in = _cast(ctx, qv.reshape(B * S, M, Hs, D))
            k_in = _cast(ctx, expand_heads(ctx.plan, ks, task))
            v_in = _cast(ctx, expand_heads(ctx.plan, vs, task))
            if ctx.order_fn is not None:
                qo, ko, spec = _order(ctx, task, src, spec)
                q_in, k_in, v_in = q_in[:, qo], k_in[:, ko], v_in[:, ko]
            layout = _sparse_layout(ctx, task, src, B, Hs, D, spec)
            if layout is not None:
                o, l, kept, computed = sparse_forward(layout, q_in, k_in, v_in, ctx.scale, ctx.kernel)
                ctx.profiler.computed_blocks += 1
                ctx.profiler.computed_tiles += computed
                merge_(q_view(ctx.plan, out, ctx.rank, task), q_view(ctx.plan, lse, ctx.rank, task),
                       o.view(B, S, M, Hs, D), l.view(B, S, M, Hs))
                saved.append(kept)
                continue
            spec = _batched_mask(spec, B, q.device)
            o, l, kept, skipped = block_forward(q_in, k_in, v_in, ctx.scale, spec, ctx.kernel, ctx.tile)
            if ctx.order_fn is not None:  # undo the order: position i of the task gets its own row
                inv = torch.argsort(qo)
                o, l = o[:, inv], l[:, inv]
            ctx.profiler.computed_blocks += 1
            ctx.profiler.skipped_blocks += skipped
            tiles = -(-M // ctx.tile) * -(-k_in.shape[1] // ctx.tile)
            ctx.profiler.computed_tiles += tiles - skipped if kept[0] == "math" else tiles
            merge_(q_view(ctx.plan, out, ctx.rank, task), q_view(ctx.plan, lse, ctx.rank, task),
                   o.view(B, S, M, Hs, D), l.view(B, S, M, Hs))
            saved.append(kept)


def _local_kv(ctx: RingContext, k: torch.Tensor, v: torch.Tensor):
    """Task -> this rank's own (K, V) slices for its keys, (B, S, L, Kn, D) each (cached per item)."""
    cache = {}

    def kv_of(task):
        if task.item not in cache:
            cache[task.item] = (kv_view(ctx.plan, k, ctx.rank, task.item), kv_view(ctx.plan, v, ctx.rank, task.item))
        return cache[task.item]

    return kv_of


def ring_forward(ctx: RingContext, q, k, v):
    """Returns out (B,T,H,D) and lse (B,T,H) in the accumulator dtype, and kernel state."""
    B, T, H, D = q.shape
    acc = accumulator_dtype(q.dtype)
    out = torch.zeros(B, T, H, D, dtype=acc, device=q.device)
    lse = torch.full((B, T, H), float("-inf"), dtype=acc, device=q.device)
    me, W = ctx.rank, ctx.world
    saved: List[list] = [[] for _ in range(W)]
    ring = ctx.transfers(B, D) if W > 1 else None
    nxt = ring.post_kv(k, v, 1) if W > 1 else None  # step 1's keys travel during step 0
    _forward_tasks(ctx, ctx.plan.tasks(me, me), me, q, _local_kv(ctx, k, v), out, lse, saved[0])
    for step in range(1, W):
        cur = nxt
        if ctx.async_comm and step + 1 < W:  # overlap: step+1's keys travel during step's compute
            nxt = ring.post_kv(k, v, step + 1)
        got = ring.receive(cur)
        _forward_tasks(ctx, ctx.plan.tasks(me, cur.peer), cur.peer, q, _lookup(got), out, lse, saved[step])
        ring.release(cur)
        if not ctx.async_comm and step + 1 < W:  # synchronous ring: one transfer at a time
            nxt = ring.post_kv(k, v, step + 1)
    return out, lse, saved


# --------------------------------------------------------------------------- backward
def _backward_tasks(ctx, tasks, src, saved, q, out, lse, dout, kv_of, dq):
    """dQ into ``dq``; returns the dK/dV of the keys used, by item, (B, S, L, Kn, D) each."""
    B, _, _, D = q.shape
    grads = {}
    with ctx.profiler.compute.span():
        for task, kept in zip(tasks, saved):
            if kept is None:
                continue
            spec = _batched_mask(_spec(ctx, task, src), B, q.device)
            ks, vs = kv_of(task)
            qv = q_view(ctx.plan, q, ctx.rank, task)
            S, M, Hs = qv.shape[1], qv.shape[2], qv.shape[3]
            q_in = _cast(ctx, qv.reshape(B * S, M, Hs, D))
            k_in = _cast(ctx, expand_heads(ctx.plan, ks, task))
            v_in = _cast(ctx, expand_heads(ctx.plan, vs, task))
            o_in = q_view(ctx.plan, out, ctx.rank, task).reshape(B * S, M, Hs, D)
            do_in = q_view(ctx.plan, dout, ctx.rank, task).reshape(B * S, M, Hs, D)
            l_in = q_view(ctx.plan, lse, ctx.rank, task).reshape(B * S, M, Hs)
            if ctx.order_fn is not None:
                qo, ko, spec = _order(ctx, task, src, _spec(ctx, task, src))
                q_in, k_in, v_in = q_in[:, qo], k_in[:, ko], v_in[:, ko]
                o_in, do_in, l_in = o_in[:, qo], do_in[:, qo], l_in[:, qo]
            if kept[0] == "sparse":
                gq, gk, gv = sparse_backward(kept, q_in, k_in, v_in, o_in, do_in, l_in, ctx.scale)
            else:
                gq, gk, gv = block_backward(kept, q_in, k_in, v_in, o_in, do_in, l_in, ctx.scale, spec, ctx.tile)
            if ctx.order_fn is not None:
                gq, gk, gv = gq[:, torch.argsort(qo)], gk[:, torch.argsort(ko)], gv[:, torch.argsort(ko)]
            q_view(ctx.plan, dq, ctx.rank, task).add_(gq.reshape(B, S, M, Hs, D).to(dq.dtype))
            L = k_in.shape[1]
            if task.item not in grads:
                grads[task.item] = (torch.zeros(ks.shape, dtype=dq.dtype, device=q.device),
                                    torch.zeros(ks.shape, dtype=dq.dtype, device=q.device))
            dk_t, dv_t = grads[task.item]
            dk_t.add_(reduce_heads(ctx.plan, gk.reshape(B, S, L, Hs, D).to(dk_t.dtype), task))
            dv_t.add_(reduce_heads(ctx.plan, gv.reshape(B, S, L, Hs, D).to(dv_t.dtype), task))
    return grads


def _add_to_kv(ctx: RingContext, dk, dv, grads) -> None:
    """Add per-item dK/dV, (B, S, L, Kn, D), where this rank's keys live."""
    for item, (gk, gv) in grads.items():
        add_to_kv(ctx.plan, dk, ctx.rank, item, gk)
        add_to_kv(ctx.plan, dv, ctx.rank, item, gv)


def ring_backward(ctx: RingContext, q, k, v, out, lse, dout, saved):
    B, T, H, D = q.shape
    acc = accumulator_dtype(q.dtype)
    dq = torch.zeros(B, T, H, D, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    dout = dout.to(acc)
    me, W = ctx.rank, ctx.world
    ring = ctx.transfers(B, D) if W > 1 else None
    nxt = ring.post_kv(k, v, 1) if W > 1 else None  # the same keys again: recomputed, not stored
    _add_to_kv(ctx, dk, dv, _backward_tasks(ctx, ctx.plan.tasks(me, me), me, saved[0], q, out, lse, dout,
                                            _local_kv(ctx, k, v), dq))
    homebound = []  # dK/dV transfers on their way to the keys' owners
    for step in range(1, W):
        cur = nxt
        if ctx.async_comm and step + 1 < W:
            nxt = ring.post_kv(k, v, step + 1)
        got = ring.receive(cur)
        grads = _backward_tasks(ctx, ctx.plan.tasks(me, cur.peer), cur.peer, saved[step], q, out, lse, dout,
                                _lookup(got), dq)
        ring.release(cur)
        homebound.append(ring.post_grads(step, cur, grads, acc))
        if len(homebound) > 1 or not ctx.async_comm:  # keep at most one in flight
            _add_to_kv(ctx, dk, dv, ring.settle(homebound.pop(0)))
        if not ctx.async_comm and step + 1 < W:
            nxt = ring.post_kv(k, v, step + 1)
    for transfer in homebound:
        _add_to_kv(ctx, dk, dv, ring.settle(transfer))
    return dq, dk, dv


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: inputs are this rank's shard; lse is returned, not differentiated."""

    @staticmethod
    def forward(fctx, q, k, v, ctx: RingContext):
        out, lse, saved = ring_forward(ctx, q, k, v)
        fctx.save_for_backward(q, k, v, out, lse)
        fctx.ring = ctx
        fctx.kernel_state = saved
        result = out.to(q.dtype)
        fctx.mark_non_differentiable(lse)
        return result, lse

    @staticmethod
    def backward(fctx, dout, _dlse):
        q, k, v, out, lse = fctx.saved_tensors
        ctx: RingContext = fctx.ring
        with ctx.profiler.total.span():
            dq, dk, dv = ring_backward(ctx, q, k, v, out, lse, dout, fctx.kernel_state)
        if ctx.grad_check is not None:
            for name, g in (("q", dq), ("k", dk), ("v", dv)):
                ctx.grad_check(name, g)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None
