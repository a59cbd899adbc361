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

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .comm import BufferPool, RingComm
from .kernels import BlockSpec, block_backward, block_forward
from .merge import accumulator_dtype, merge_
from .plan import CAUSAL, Item, RingPlan, Task
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


# ------------------------------------------------------------------------------ helpers
def _kv_select(ctx: RingContext, x: torch.Tensor, rank: int, item: Item) -> torch.Tensor:
    """Selected tokens and needed kv heads of a local tensor: (B, S, L, Kn, D)."""
    piece = ctx.plan.pieces[rank][item.k_piece]
    view = ctx.plan.select(x, piece, item.pattern, item.offset)  # (B, S, L, K, D)
    needed, _ = ctx.plan.kv_heads(item.pattern, item.offset)
    if needed == list(range(x.shape[2])):
        return view
    return view[:, :, :, needed]


def _expand_heads(ctx: RingContext, x: torch.Tensor, task: Task) -> torch.Tensor:
    """(B, S, L, Kn, D) kv -> (B*S, L, Hs, D): one kv head per selected query head (GQA)."""
    _, expand = ctx.plan.kv_heads(task.pattern, task.offset)
    if expand != list(range(x.shape[3])):
        x = x[:, :, :, expand]
    return x.flatten(0, 1)  # (B*S, L, Hs, D)


def _reduce_heads(ctx: RingContext, g: torch.Tensor, task: Task) -> torch.Tensor:
    """Inverse of _expand_heads for gradients: (B, S, L, Hs, D) -> (B, S, L, Kn, D)."""
    needed, expand = ctx.plan.kv_heads(task.pattern, task.offset)
    if expand == list(range(g.shape[3])) and len(needed) == g.shape[3]:
        return g
    out = g.new_zeros(g.shape[:3] + (len(needed), g.shape[4]))
    return out.index_add_(3, torch.tensor(expand, device=g.device), g)


def _q_view(ctx: RingContext, x: torch.Tensor, task: Task) -> torch.Tensor:
    """View (B, S, M, Hs, ...) of a query-side tensor (q, out, lse, dq) for ``task``."""
    piece = ctx.plan.pieces[ctx.rank][task.q_piece]
    view = ctx.plan.select(x, piece, task.pattern, task.offset)
    return view[:, :, :, ctx.plan.q_heads(task.pattern, task.offset)]


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


# ------------------------------------------------------------------------- transfers
@dataclass
class _Transfer:
    """One step's posted K/V (or dK/dV) exchange and the receive buffers it fills."""

    peer: int  #: the rank the buffers are received from
    items: List[Item]
    k_buf: Optional[torch.Tensor]
    v_buf: Optional[torch.Tensor]
    pending: object
    keep: list  # send buffers must live until the transfer completes

    def slices(self, ctx: RingContext, batch: int, head_dim: int) -> Dict[Item, Tuple[torch.Tensor, torch.Tensor]]:
        out, pos = {}, 0
        for item in self.items:
            shape = ctx.plan.item_shape(item, batch, head_dim)
            n = math.prod(shape)
            k = self.k_buf[pos:pos + n].view(shape).unsqueeze(1)  # (B, 1, L, Kn, D)
            v = self.v_buf[pos:pos + n].view(shape).unsqueeze(1)
            out[item] = (k, v)
            pos += n
        return out


def _post_kv(ctx: RingContext, k: torch.Tensor, v: torch.Tensor, step: int) -> _Transfer:
    """Post step ``step``'s K/V transfer: send own slices to one partner, receive another's."""
    src, dst = ctx.comm.partners(step)
    me = ctx.rank
    B, _, _, D = k.shape
    sends, keep = [], []
    send_items = ctx.plan.items(me, dst)
    if send_items:
        kb = torch.cat([_kv_select(ctx, k, me, it).reshape(-1) for it in send_items])
        vb = torch.cat([_kv_select(ctx, v, me, it).reshape(-1) for it in send_items])
        sends = [(dst, kb), (dst, vb)]
        keep = [kb, vb]
        ctx.profiler.bytes_sent += 2 * kb.numel() * kb.element_size()
    recv_items = ctx.plan.items(src, me)
    kr = vr = None
    recvs = []
    if recv_items:
        n = sum(math.prod(ctx.plan.item_shape(it, B, D)) for it in recv_items)
        kr = ctx.pool.get(n, k.dtype, k.device)
        vr = ctx.pool.get(n, v.dtype, v.device)
        recvs = [(src, kr), (src, vr)]
    if ctx.profile_communication:
        ctx.profiler.log_step(step=step, send_to=dst, recv_from=src,
                              bytes_sent=sum(t.numel() * t.element_size() for t in keep))
    pending = ctx.comm.exchange(sends, recvs, step, tag=4 * step)
    return _Transfer(src, recv_items, kr, vr, pending, keep)


def _receive(ctx: RingContext, k, v, step: int, cur: "_Transfer"):
    """Post step+1's K/V transfer (overlap mode) and wait for step's: (next transfer, kv by item)."""
    nxt = _post_kv(ctx, k, v, step + 1) if ctx.async_comm and step + 1 < ctx.world else None
    _wait(ctx, cur)
    ctx.profiler.ring_steps += 1
    return nxt, cur.slices(ctx, k.shape[0], k.shape[3])


def _lookup(got):
    """Task -> the received (K, V) slices its keys come from."""
    return lambda task: got[Item(task.pattern, task.offset, task.k_piece)]


def _release(ctx: RingContext, cur: "_Transfer") -> None:
    for buf in (cur.k_buf, cur.v_buf):
        if buf is not None:
            ctx.pool.put(buf)


def _wait(ctx: RingContext, transfer) -> None:
    with ctx.profiler.comm.span():
        transfer.pending.wait()
        if ctx.sync_profiling and ctx.device.type == "cuda":
            # enable_profiling: charge the whole transfer here rather than only the part the
            # overlap left exposed (exact attribution, at the cost of the overlap)
            torch.cuda.synchronize(ctx.device)


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
            qv = _q_view(ctx, q, task)  # (B, S, M, Hs, D)
            S, M, Hs = qv.shape[1], qv.shape[2], qv.shape[3]
            q_in = _cast(ctx, qv.reshape(B * S, M, Hs, D))
            k_in = _cast(ctx, _expand_heads(ctx, ks, task))
            v_in = _cast(ctx, _expand_heads(ctx, vs, task))
            if ctx.order_fn is not None:
                qo, ko, spec = _order(ctx, task, src, spec)
                q_in, k_in, v_in = q_in[:, qo], k_in[:, ko], v_in[:, ko]
            layout = _sparse_layout(ctx, task, src, B, Hs, D, spec)
            if layout is not None:
                o, l, kept, computed = sparse_forward(layout, q_in, k_in, v_in, ctx.scale, ctx.kernel)
                ctx.profiler.computed_blocks += 1
                ctx.profiler.computed_tiles += computed
                merge_(_q_view(ctx, out, task), _q_view(ctx, lse, task),
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
            merge_(_q_view(ctx, out, task), _q_view(ctx, lse, task),
                   o.view(B, S, M, Hs, D), l.view(B, S, M, Hs))
            saved.append(kept)


def ring_forward(ctx: RingContext, q, k, v):
    """Returns out (B,T,H,D) and lse (B,T,H) in the accumulator dtype, and kernel state."""
    B, T, H, D = q.shape
    acc = accumulator_dtype(q.dtype)
    out = torch.zeros(B, T, H, D, dtype=acc, device=q.device)
    lse = torch.full((B, T, H), float("-inf"), dtype=acc, device=q.device)
    me, W = ctx.rank, ctx.world
    saved: List[list] = [[] for _ in range(W)]
    nxt = _post_kv(ctx, k, v, 1) if W > 1 else None

    def local_kv(task):
        item = Item(task.pattern, task.offset, task.k_piece)
        return _kv_select(ctx, k, me, item), _kv_select(ctx, v, me, item)

    _forward_tasks(ctx, ctx.plan.tasks(me, me), me, q, local_kv, out, lse, saved[0])
    for step in range(1, W):
        cur = nxt
        nxt, got = _receive(ctx, k, v, step, cur)
        _forward_tasks(ctx, ctx.plan.tasks(me, cur.peer), cur.peer, q, _lookup(got), out, lse, saved[step])
        _release(ctx, cur)
        if not ctx.async_comm and step + 1 < W:
            nxt = _post_kv(ctx, k, v, step + 1)
    return out, lse, saved


# --------------------------------------------------------------------------- backward
def _backward_tasks(ctx, tasks, src, saved, q, out, lse, dout, kv_of, dq, dkv_of):
    B, _, _, D = q.shape
    with ctx.profiler.compute.span():
        for task, kept in zip(tasks, saved):
            if kept is None:
                continue
            spec = _batched_mask(_spec(ctx, task, src), B, q.device)
            ks, vs = kv_of(task)
            qv = _q_view(ctx, q, task)
            S, M, Hs = qv.shape[1], qv.shape[2], qv.shape[3]
            q_in = _cast(ctx, qv.reshape(B * S, M, Hs, D))
            k_in = _cast(ctx, _expand_heads(ctx, ks, task))
            v_in = _cast(ctx, _expand_heads(ctx, vs, task))
            o_in = _q_view(ctx, out, task).reshape(B * S, M, Hs, D)
            do_in = _q_view(ctx, dout, task).reshape(B * S, M, Hs, D)
            l_in = _q_view(ctx, lse, task).reshape(B * S, M, Hs)
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
            _q_view(ctx, dq, task).add_(gq.reshape(B, S, M, Hs, D).to(dq.dtype))
            L = k_in.shape[1]
            dk_t, dv_t = dkv_of(task)
            dk_t.add_(_reduce_heads(ctx, gk.reshape(B, S, L, Hs, D).to(dk_t.dtype), task))
            dv_t.add_(_reduce_heads(ctx, gv.reshape(B, S, L, Hs, D).to(dv_t.dtype), task))


def _local_grad_view(ctx, g, item):
    """(B, S, L, Kn, D) accumulation target inside a local dk/dv for ``item``'s kv heads."""
    needed, _ = ctx.plan.kv_heads(item.pattern, item.offset)
    view = ctx.plan.select(g, ctx.plan.pieces[ctx.rank][item.k_piece], item.pattern, item.offset)
    if needed == list(range(g.shape[2])):
        return view, None
    return view, needed


def ring_backward(ctx: RingContext, q, k, v, out, lse, dout, saved):
    B, T, H, D = q.shape
    acc = accumulator_dtype(q.dtype)
    dq = torch.zeros(B, T, H, D, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    dout = dout.to(acc)
    me, W = ctx.rank, ctx.world

    def add_local(g, item, value):
        view, needed = _local_grad_view(ctx, g, item)
        if needed is None:
            view.add_(value)
        else:
            view.index_add_(3, torch.tensor(needed, device=g.device), value)

    class _Scratch:  # per-task dK/dV scratch, then added where it belongs
        def __init__(self):
            self.grads = {}

        def __call__(self, task):
            item = Item(task.pattern, task.offset, task.k_piece)
            if item not in self.grads:
                shape_src = ks_shape[item]
                self.grads[item] = (torch.zeros(shape_src, dtype=acc, device=q.device),
                                    torch.zeros(shape_src, dtype=acc, device=q.device))
            return self.grads[item]

    # step 0: local keys, gradients accumulate locally
    nxt = _post_kv(ctx, k, v, 1) if W > 1 else None
    local_kv = {}

    def kv_local(task):
        item = Item(task.pattern, task.offset, task.k_piece)
        if item not in local_kv:
            local_kv[item] = (_kv_select(ctx, k, me, item), _kv_select(ctx, v, me, item))
        return local_kv[item]

    ks_shape = {}
    tasks0 = ctx.plan.tasks(me, me)
    for t in tasks0:
        it = Item(t.pattern, t.offset, t.k_piece)
        ks_shape[it] = kv_local(t)[0].shape
    scratch = _Scratch()
    _backward_tasks(ctx, tasks0, me, saved[0], q, out, lse, dout, kv_local, dq, scratch)
    for item, (gk, gv) in scratch.grads.items():
        add_local(dk, item, gk)
        add_local(dv, item, gv)

    grad_transfers = []
    for step in range(1, W):
        cur = nxt
        nxt, got = _receive(ctx, k, v, step, cur)
        ks_shape = {it: kv[0].shape for it, kv in got.items()}
        scratch = _Scratch()
        _backward_tasks(ctx, ctx.plan.tasks(me, cur.peer), cur.peer, saved[step], q, out, lse, dout,
                        _lookup(got), dq, scratch)
        _release(ctx, cur)
        grad_transfers.append(_post_grads(ctx, step, cur, scratch.grads, B, D, acc, q.device))
        if len(grad_transfers) > 1 or not ctx.async_comm:  # keep at most one in flight
            _settle_grads(ctx, grad_transfers.pop(0), add_local, dk, dv, B, D)
        if not ctx.async_comm and step + 1 < W:
            nxt = _post_kv(ctx, k, v, step + 1)
    for tr in grad_transfers:
        _settle_grads(ctx, tr, add_local, dk, dv, B, D)
    return dq, dk, dv


def _post_grads(ctx, step, cur: _Transfer, grads, B, D, acc, device) -> _Transfer:
    """Send the dK/dV of the keys received at ``step`` back to their owner (float32)."""
    src, dst = ctx.comm.partners(step)
    sends, keep = [], []
    if cur.items:
        zeros = lambda it: torch.zeros(ctx.plan.item_shape(it, B, D), dtype=acc, device=device)
        kb = torch.cat([(grads[it][0] if it in grads else zeros(it).unsqueeze(1)).reshape(-1) for it in cur.items])
        vb = torch.cat([(grads[it][1] if it in grads else zeros(it).unsqueeze(1)).reshape(-1) for it in cur.items])
        sends = [(src, kb), (src, vb)]
        keep = [kb, vb]
        ctx.profiler.bytes_sent += 2 * kb.numel() * kb.element_size()
    mine = ctx.plan.items(ctx.rank, dst)  # what I sent to dst at this step comes back
    kr = vr = None
    recvs = []
    if mine:
        n = sum(math.prod(ctx.plan.item_shape(it, B, D)) for it in mine)
        kr = torch.empty(n, dtype=acc, device=device)
        vr = torch.empty(n, dtype=acc, device=device)
        recvs = [(dst, kr), (dst, vr)]
    pending = ctx.comm.exchange(sends, recvs, step, tag=4 * step + 2)
    return _Transfer(dst, mine, kr, vr, pending, keep)


def _settle_grads(ctx, tr: _Transfer, add_local, dk, dv, B, D) -> None:
    """Wait for the dK/dV of this rank's keys and add them where the keys live."""
    _wait(ctx, tr)
    for item, (gk, gv) in tr.slices(ctx, B, D).items():
        add_local(dk, item, gk)
        add_local(dv, item, gv)


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
