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

What travels and its buffers: ``RingTransfers`` (comm.py). How one task is computed:
the variant's ``TaskPath`` (tasks.py, hilbert.py, block_sparse.py). Where a task's
tokens live: views.py. This file is only the schedule.

Letters: B batch, T local length, H query heads, K kv heads, D head dim,
S segments in a task (1 for spanning patterns), M/L query/key tokens of a task.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .comm import BufferPool, RingComm, RingTransfers
from .kernel_policy import KernelPolicy
from .merge import accumulator_dtype, merge_
from .plan import Item, RingPlan
from .profiling import RingProfiler
from .tasks import TaskPath
from .views import add_to_kv, expand_heads, kv_view, q_view, reduce_heads

KV = Tuple[torch.Tensor, torch.Tensor]  # (K, V) slices of one item, (B, S, L, Kn, D) each


@dataclass
class RingContext:
    """Everything one call of the ring needs besides the tensors."""

    plan: RingPlan
    comm: Optional[RingComm]
    scale: float
    profiler: RingProfiler
    pool: BufferPool
    #: which kernel computes each task, and what each refused so far: the module's (kernel_policy.py)
    kernels: KernelPolicy = field(default_factory=KernelPolicy)
    tile: int = 1024
    dropout_p: float = 0.0
    dropout_seed: int = 0
    compute_dtype: Optional[torch.dtype] = None  #: mixed precision: blocks in this dtype
    async_comm: bool = True
    sync_profiling: bool = False
    profile_communication: bool = False
    #: how one task is computed: the variant's path (masks, token order, sparse kernels)
    path: TaskPath = field(default_factory=TaskPath)
    #: (name, gradient, the ring's group or None) -> None: run on dq/dk/dv before they leave
    #: backward (validate_gradients, execution.py)
    grad_check: Optional[Callable[[str, torch.Tensor, Optional[object]], None]] = None
    #: the variant's masks no path takes over (mask_protocol.MaskSet): tile masks from their answers
    masks: Optional[object] = None
    #: packed documents of this call (documents.Documents): a query sees its own document only
    documents: Optional[object] = None
    device: torch.device = torch.device("cpu")

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
def _cast(ctx: RingContext, x: torch.Tensor) -> torch.Tensor:
    return x.to(ctx.compute_dtype) if ctx.compute_dtype is not None else x


#: Query tokens (batch x segments x M) above which a task runs in groups of whole segments. A
#: dilated pattern's task batches every segment of the shard, so computed at once its kv heads
#: expanded for GQA and its float32 gradients would be whole-shard transients (~30 GiB at 2M
#: tokens of the 350m model); in groups they are bounded by this.
SEGMENT_GROUP_TOKENS = 2**18


def _segment_groups(ctx: RingContext, spec, batch: int, segments: int, queries: int) -> List[slice]:
    """The slices of a task's S segments computed together: all of them, unless the task is
    large and its blocks split by segment (the standard path, without a tile mask or dropout,
    which are laid out per task; documents split with it: _group_spec), when each group holds
    about SEGMENT_GROUP_TOKENS queries."""
    per = max(1, SEGMENT_GROUP_TOKENS // max(1, batch * queries))
    plain = type(ctx.path) is TaskPath and spec.token_mask is None and spec.dropout_p == 0.0
    if segments <= per or not plain:
        return [slice(None)]
    return [slice(s, min(s + per, segments)) for s in range(0, segments, per)]


def _group_spec(spec, batch: int, group: slice):
    """The task's block spec for one segment group (its documents' rows only)."""
    if spec.documents is None or group == slice(None):
        return spec
    return dataclasses.replace(spec, documents=spec.documents.segments(batch, group))


def _group_inputs(ctx: RingContext, task, qv: torch.Tensor, kv: KV, group: slice):
    """One segment group's kernel inputs: q (B*s, M, Hs, D), k and v (B*s, L, Hs, D)."""
    return (_cast(ctx, qv[:, group].flatten(0, 1)), _cast(ctx, expand_heads(ctx.plan, kv[0][:, group], task)),
            _cast(ctx, expand_heads(ctx.plan, kv[1][:, group], task)))


def _local_kv(ctx: RingContext, k: torch.Tensor, v: torch.Tensor) -> Callable[..., KV]:
    """Task -> this rank's own (K, V) slices for its keys (cached per item: a head subset is a copy)."""
    cache: Dict[Item, KV] = {}

    def kv_of(task) -> KV:
        if task.item not in cache:
            cache[task.item] = (kv_view(ctx.plan, k, ctx.rank, task.item), kv_view(ctx.plan, v, ctx.rank, task.item))
        return cache[task.item]

    return kv_of


def _received(got: Dict[Item, KV]) -> Callable[..., KV]:
    """Task -> the received (K, V) slices its keys come from."""
    return lambda task: got[task.item]


# ---------------------------------------------------------------------------- forward
def _forward_step(ctx: RingContext, src: int, q, kv_of, out, lse) -> list:
    """Merge every task on ``src``'s keys into out/lse; returns per task its (segment groups, kernel
    states), or None for a task the variant's mask skipped."""
    tasks, saved = ctx.plan.tasks(ctx.rank, src), []
    # (pattern, offset, piece, piece) blocks that the plan dropped as empty by construction
    ctx.profiler.skipped_blocks += ctx.plan.num_candidate_blocks(ctx.rank, src) - len(tasks)
    with ctx.profiler.compute.span():
        for task in tasks:
            spec = ctx.path.spec(ctx, task, src, q.shape[0])
            if spec is None:  # the variant's mask keeps nothing of this task
                ctx.profiler.skipped_blocks += 1
                saved.append(None)
                continue
            saved.append(_forward_task(ctx, task, src, spec, q, kv_of(task), out, lse))
    return saved


def _forward_task(ctx: RingContext, task, src: int, spec, q, kv: KV, out, lse):
    """Merge one task into out/lse, segment group by group; returns (groups, kernel states)."""
    qv = q_view(ctx.plan, q, ctx.rank, task)  # (B, S, M, Hs, D)
    acc_out, acc_lse = q_view(ctx.plan, out, ctx.rank, task), q_view(ctx.plan, lse, ctx.rank, task)
    groups = _segment_groups(ctx, spec, qv.shape[0], qv.shape[1], qv.shape[2])
    prof, states, first = ctx.profiler, [], None
    for group in groups:
        o, l, state = ctx.path.forward(ctx, task, src, _group_spec(spec, qv.shape[0], group),
                                       *_group_inputs(ctx, task, qv, kv, group))
        part_out, part_lse = acc_out[:, group], acc_lse[:, group]
        merge_(part_out, part_lse, o.view(part_out.shape), l.view(part_lse.shape))  # (B, s, M, Hs[, D])
        states.append(state)
        first = first or (prof.computed_blocks, prof.skipped_blocks, prof.computed_tiles)
    # the statistics count a task once (one block), however it was grouped: the first group's
    # counts stand for it (the math kernel's tiles skipped in the other groups are not counted)
    if len(groups) > 1:
        prof.computed_blocks, prof.skipped_blocks, prof.computed_tiles = first
    return groups, states


def ring_forward(ctx: RingContext, q, k, v):
    """Returns out (B,T,H,D) and lse (B,T,H) in the accumulator dtype, and kernel states per step."""
    B, T, H, D = q.shape
    acc = accumulator_dtype(q.dtype)
    out = torch.zeros(B, T, H, D, dtype=acc, device=q.device)
    lse = torch.full((B, T, H), float("-inf"), dtype=acc, device=q.device)
    me, W = ctx.rank, ctx.world
    ring = ctx.transfers(B, D) if W > 1 else None
    nxt = ring.post_kv(k, v, 1) if W > 1 else None  # step 1's keys travel during step 0
    saved = [_forward_step(ctx, me, q, _local_kv(ctx, k, v), out, lse)]
    for step in range(1, W):
        cur = nxt
        if ctx.async_comm and step + 1 < W:  # overlap: step+1's keys travel during step's compute
            nxt = ring.post_kv(k, v, step + 1)
        got = ring.receive(cur)
        saved.append(_forward_step(ctx, cur.peer, q, _received(got), out, lse))
        ring.release(cur)
        if not ctx.async_comm and step + 1 < W:  # synchronous ring: one transfer at a time
            nxt = ring.post_kv(k, v, step + 1)
    return out, lse, saved


# --------------------------------------------------------------------------- backward
def _backward_step(ctx: RingContext, src: int, saved, q, out, lse, dout, kv_of, dq,
                   local_kv: Optional[KV] = None) -> Dict[Item, KV]:
    """Add dQ of every task on ``src``'s keys into ``dq``; returns their dK/dV by item.

    ``local_kv``: this rank's (dk, dv) when the keys are its own: each task's dK/dV is added
    there at once, so no per-item scratch (float32, up to the whole shard's keys per pattern)
    is alive; the returned dict is then empty.
    """
    plan, me = ctx.plan, ctx.rank
    grads: Dict[Item, KV] = {}  # (B, S, L, Kn, D) each, in the accumulator dtype
    with ctx.profiler.compute.span():
        for task, task_saved in zip(plan.tasks(me, src), saved):
            if task_saved is None:
                continue
            spec = ctx.path.spec(ctx, task, src, q.shape[0])
            kv = kv_of(task)
            if local_kv is None and task.item not in grads:  # scratch per item: sent home once complete
                grads[task.item] = (torch.zeros(kv[0].shape, dtype=dq.dtype, device=dq.device),
                                    torch.zeros(kv[0].shape, dtype=dq.dtype, device=dq.device))
            qv = q_view(plan, q, me, task)  # (B, S, M, Hs, D)
            # out, dout, lse as the task sees them; dout reaches here in the caller's dtype and is
            # widened per group, so no float32 copy of the whole shard is alive (a widening is exact)
            merged = [q_view(plan, x, me, task) for x in (out, dout, lse)]  # (B, S, M, Hs[, D]) each
            dq_t = q_view(plan, dq, me, task)  # (B, S, M, Hs, D)
            for group, state in zip(*task_saved):
                gq, gk, gv = ctx.path.backward(ctx, task, src, _group_spec(spec, qv.shape[0], group), state,
                                               *_group_inputs(ctx, task, qv, kv, group),
                                               *(x[:, group].flatten(0, 1).to(out.dtype) for x in merged))
                part = dq_t[:, group]
                part.add_(gq.reshape(part.shape).to(dq.dtype))
                shape = part.shape[:2] + gk.shape[1:]  # (B, s, L, Hs, D)
                for i, g in enumerate((gk, gv)):
                    value = reduce_heads(plan, g.reshape(shape).to(dq.dtype), task)  # (B, s, L, Kn, D)
                    if local_kv is not None:
                        add_to_kv(plan, local_kv[i], me, task.item, value, group)
                    else:
                        grads[task.item][i][:, group].add_(value)
    return grads


def _add_to_kv(ctx: RingContext, dk, dv, grads: Dict[Item, KV]) -> None:
    """Add per-item dK/dV where this rank's keys live."""
    for item, (gk, gv) in grads.items():
        add_to_kv(ctx.plan, dk, ctx.rank, item, gk)
        add_to_kv(ctx.plan, dv, ctx.rank, item, gv)


def ring_backward(ctx: RingContext, q, k, v, out, lse, dout, saved):
    B, T, H, D = q.shape
    acc = accumulator_dtype(q.dtype)
    dq = torch.zeros(B, T, H, D, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    me, W = ctx.rank, ctx.world
    ring = ctx.transfers(B, D) if W > 1 else None
    nxt = ring.post_kv(k, v, 1) if W > 1 else None  # the same keys again: recomputed, not stored
    _backward_step(ctx, me, saved[0], q, out, lse, dout, _local_kv(ctx, k, v), dq, local_kv=(dk, dv))
    homebound = []  # dK/dV transfers on their way to the keys' owners
    for step in range(1, W):
        cur = nxt
        if ctx.async_comm and step + 1 < W:
            nxt = ring.post_kv(k, v, step + 1)
        got = ring.receive(cur)
        grads = _backward_step(ctx, cur.peer, saved[step], q, out, lse, dout, _received(got), dq)
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
            grads = list(ring_backward(ctx, q, k, v, out, lse, dout, fctx.kernel_state))  # dq, dk, dv
        if ctx.grad_check is not None:
            group = ctx.comm.group if ctx.comm is not None else None  # the group the ring ran on
            for name, g in zip("qkv", grads):
                ctx.grad_check(name, g, group)
        for i, x in enumerate((q, k, v)):  # one float32 gradient at a time becomes the input's dtype
            grads[i] = grads[i].to(x.dtype)
        return grads[0], grads[1], grads[2], None
