"""How each route of an attention call runs (route.py chooses; ulysses.py runs HYBRID).

Every executor takes the module (its config, profiler, pool, kernel policy, variant
declarations), the call's description and the (B, T, H, D) tensors, and returns what
``forward`` returns: out, or (out, lse).
"""

from __future__ import annotations

import logging
import math

import torch

from .agreement import call_signature, verify_across_ranks
from .comm import RingComm
from .documents import DocumentPlan, documents_for
from .flex import flex_attention
from .gather import GatherSequence, ShardSequence
from .mask_protocol import MaskSet
from .plan import get_plan
from .ring import RingAttentionFunction, RingContext
from .route import AttentionCall, Route
from .tasks import TaskPath

log = logging.getLogger(__name__)


def default_scale(cfg, head_dim: int) -> float:
    """``config.scale``, else 1/sqrt(head_dim)."""
    return cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(head_dim)


def run_sdpa(attn, call: AttentionCall, q, k, v, document_ids) -> torch.Tensor:
    """One device, dense, nothing masked: one fused scaled_dot_product_attention call."""
    with attn.profiler.total.span(), attn.profiler.compute.span():
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H|K, T, D) views
            is_causal=call.is_causal, scale=default_scale(attn.config, q.shape[-1]),
            enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)  # (B, H, T, D) -> (B, T, H, D)


def run_flex(attn, call: AttentionCall, q, k, v, document_ids) -> torch.Tensor:
    """One device under the call's masks: one FlexAttention call (flex.py), in the kernel order
    the masks ask for and the output back in the caller's."""
    with attn.profiler.total.span(), attn.profiler.compute.span():
        order, back, mask = attn._flex_mask(call, q.device, document_ids)
        if order is not None:  # (B, N, ...) into the masks' order and the output back out of it
            q, k, v = (x.index_select(1, order) for x in (q, k, v))
        out = flex_attention(q, k, v, default_scale(attn.config, q.shape[-1]), mask)
        return out if back is None else out.index_select(1, back)


def _ring_comm(attn, call: AttentionCall):
    """The module's RingComm for the call's group (None on one device), built once per group."""
    if call.world == 1:
        return None
    if attn._comm is None or attn._comm.group is not call.group:
        attn._comm = RingComm(call.group, attn.config.comm_timeout_s, attn.config.custom_ring_order,
                              attn.timed_waits)
    return attn._comm


def _ring_plan(attn, call: AttentionCall):
    """The tasks of the call, without those the variant's mask empties."""
    H, K = call.q_shape[2], call.k_shape[2]
    plan = get_plan(call.seq_len, call.world, call.layout, call.patterns, call.is_causal, H, K,
                    attn._sparse_key(), call.head_offset)  # global heads (ulysses.py)
    return attn._restrict_plan(plan)


def _ring_context(attn, call: AttentionCall, plan, comm, docs, device) -> RingContext:
    cfg = attn.config
    dropout = cfg.dropout if attn.training else 0.0
    path = call.options.get("path", TaskPath())
    return RingContext(
        plan=plan, comm=comm, scale=default_scale(cfg, call.q_shape[-1]), profiler=attn.profiler,
        pool=attn.pool, kernels=attn.kernels, dropout_p=dropout,
        dropout_seed=int(torch.randint(0, 2**62, (1,)).item()) if dropout > 0 else 0,
        async_comm=cfg.async_ring_communication, sync_profiling=cfg.enable_profiling,
        profile_communication=cfg.profile_communication, device=device, documents=docs,
        masks=MaskSet(m for m in attn._declared_masks(call.seq_len) if m.kind not in path.handles),
        **call.options)


def run_ring(attn, call: AttentionCall, q, k, v, document_ids):
    """The ring: plan, agreement across ranks, shard (full inputs), ring, gather (full inputs)."""
    cfg, split_here = attn.config, not call.already_split and call.world > 1
    plan, comm, docs = _ring_plan(attn, call), _ring_comm(attn, call), None
    if comm is not None:
        verify_across_ranks(comm, call_signature(call, attn.variant, cfg), q.device, attn._verified)
    if document_ids is not None:  # tasks and transfers of pieces sharing no document are dropped
        docs = documents_for(document_ids, call.group, call.layout, call.world, call.already_split)
        plan = DocumentPlan(plan, docs)
    if split_here:
        q, k, v = (ShardSequence.apply(x, call.world, call.rank, call.layout) for x in (q, k, v))
    ctx = _ring_context(attn, call, plan, comm, docs, q.device)
    with attn.profiler.total.span():
        out, lse = RingAttentionFunction.apply(q, k, v, ctx)
    if cfg.log_communication_stats and comm is not None:
        log.info("ring %s rank %d: sent %.2f MB in %d steps, waited %.2f ms (forward)", attn.variant,
                 comm.rank, attn.profiler.bytes_sent / 2**20, attn.profiler.ring_steps, attn.profiler.comm.ms())
    if cfg.aggressive_memory_cleanup:
        attn.clear_memory_pool()
    if split_here:
        out = GatherSequence.apply(out, call.group, call.layout, call.rank)
        lse = GatherSequence.apply(lse, call.group, call.layout, call.rank) if call.return_lse else lse
    return (out, lse) if call.return_lse else out


EXECUTORS = {Route.SDPA: run_sdpa, Route.FLEX: run_flex, Route.RING: run_ring}
