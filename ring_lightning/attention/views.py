"""Where a ring task's tensors live: plan selections as views of rank-local tensors.

The plan (plan.py) says which tokens and heads a task or a shipped item touches; these
helpers turn that into tensors. Query-side views share storage with the local tensor, so
the ring reads q and writes its float32 accumulators (out, lse, dq, dk, dv) in place,
even where the selection is strided (dilated patterns).

Letters: B batch, T local length, S segments of a task (1 for spanning patterns), M/L
query/key tokens of a task, H query heads, Hs the task's query heads, K kv heads, Kn the
kv heads a task needs, D head dim.
"""

from __future__ import annotations

import torch

from .plan import Item, RingPlan, Task


def _kv_selection(plan: RingPlan, x: torch.Tensor, rank: int, item: Item):
    """(B, S, L, K, D) view of ``item``'s tokens in a local (B, T, K, D) tensor, and the kv
    heads the item needs (None: all of them)."""
    view = plan.select(x, plan.pieces[rank][item.k_piece], item.pattern, item.offset)
    needed, _ = plan.kv_heads(item.pattern, item.offset)
    return view, (None if needed == list(range(x.shape[2])) else needed)


def q_view(plan: RingPlan, x: torch.Tensor, rank: int, task: Task) -> torch.Tensor:
    """(B, S, M, Hs, ...) view of a query-side tensor (q, out, lse, dq) of ``rank`` for ``task``."""
    piece = plan.pieces[rank][task.q_piece]
    view = plan.select(x, piece, task.pattern, task.offset)  # (B, S, M, H, ...)
    return view[:, :, :, plan.q_heads(task.pattern, task.offset)]


def kv_view(plan: RingPlan, x: torch.Tensor, rank: int, item: Item) -> torch.Tensor:
    """(B, S, L, Kn, D) selected tokens and needed kv heads of a local k or v.

    A view when every kv head is needed; a gather (a copy) otherwise, which is also what
    travels, so a sender never ships heads nobody reads.
    """
    view, needed = _kv_selection(plan, x, rank, item)
    return view if needed is None else view[:, :, :, needed]


def expand_heads(plan: RingPlan, x: torch.Tensor, task: Task) -> torch.Tensor:
    """(B, S, L, Kn, D) kv -> (B*S, L, Hs, D): one kv head per query head of the task (GQA)."""
    _, expand = plan.kv_heads(task.pattern, task.offset)
    if expand != list(range(x.shape[3])):
        x = x[:, :, :, expand]
    return x.flatten(0, 1)  # (B*S, L, Hs, D)


def reduce_heads(plan: RingPlan, g: torch.Tensor, task: Task) -> torch.Tensor:
    """Inverse of ``expand_heads`` for gradients: (B, S, L, Hs, D) -> (B, S, L, Kn, D)."""
    needed, expand = plan.kv_heads(task.pattern, task.offset)
    if expand == list(range(g.shape[3])) and len(needed) == g.shape[3]:
        return g
    out = g.new_zeros(g.shape[:3] + (len(needed), g.shape[4]))
    # query heads sharing a kv head add up (the adjoint of the expansion)
    return out.index_add_(3, torch.tensor(expand, device=g.device), g)


def add_to_kv(plan: RingPlan, g: torch.Tensor, rank: int, item: Item, value: torch.Tensor,
              segments: slice = slice(None)) -> None:
    """Add ``value`` (B, S, L, Kn, D) to a local dk or dv (B, T, K, D) where ``item``'s keys live
    (``segments``: only those of the item's segments, ``value`` then (B, s, L, Kn, D))."""
    view, needed = _kv_selection(plan, g, rank, item)
    view = view[:, segments]
    if needed is None:
        view.add_(value)
    else:
        view.index_add_(3, torch.tensor(needed, device=g.device), value)
