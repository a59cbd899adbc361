"""Packed documents: a query attends only to keys of its own document.

``attn(q, k, v, document_ids=ids)`` with ``ids`` (B, T) integers laid out like ``q``. The
rule is ANDed into every other one (pattern, causal, block mask); a query with no allowed
key outputs 0 (docs/ARCHITECTURE.md, "Packed documents").

What this file owns:

* ``Documents``: the GLOBAL ids of one call (a shard's ids are all-gathered once: B*N
  integers, small next to one K/V transfer) and what they imply per ring task: each task's
  query and key ids, and whether the task can hold any allowed pair at all.
* ``DocumentPlan``: the static plan (plan.py) seen through the documents. Tasks whose query
  and key pieces share no document are dropped, on every rank alike (every rank holds the
  same global ids), so their keys are neither computed on nor sent; the bytes saved are
  counted in ``get_profiling_stats()["document_bytes_saved"]``.
* ``document_position_ids``: RoPE positions that restart at 0 in every document.

"Packed" ids (non-decreasing along every row, what packing emits) make each document one
contiguous run: the task test is then an interval test, and on CUDA a task runs as one
variable-length FlashAttention call (one sequence per document, varlen.py). Other ids are
exact too, through the masked portable kernel.

Letters: B batch, N global length, T local length, S segments of a task, M/L query/key
tokens of a task.
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from ..sequence.sharding import Piece, unshard_sequence
from .mask_protocol import AttentionMask, register_mask
from .plan import FilteredPlan, Item, RingPlan, Task
from .varlen import document_sequences


def check_document_ids(ids, q: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"document_ids must be a torch.Tensor of shape (batch, seq), got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"document_ids must be an integer tensor, got {ids.dtype}")
    if ids.device != q.device:
        raise ValueError(f"document_ids are on {ids.device} but q is on {q.device}; move them with .to(q.device)")
    if tuple(ids.shape) != tuple(q.shape[:2]):
        raise ValueError(
            f"document_ids must have shape (batch, seq) = {tuple(q.shape[:2])} like q "
            f"(the rank's shard when already_split=True), got {tuple(ids.shape)}"
        )


class DocumentTask:
    """The document ids of one task, as the kernels read them (kernels.BlockSpec.documents)."""

    def __init__(self, q_ids: torch.Tensor, k_ids: torch.Tensor, packed: bool) -> None:
        self.q_ids, self.k_ids, self.packed = q_ids, k_ids, packed  # (B', M), (B', L)
        self._sequences = None

    def allowed(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """(B', 1, mq, mk) same-document mask of one tile, broadcast over heads."""
        return (self.q_ids[:, q0:q1, None] == self.k_ids[:, None, k0:k1]).unsqueeze(1)

    def segments(self, batch: int, group: slice) -> "DocumentTask":
        """The ids of the rows of segments ``group`` only (rows are batch-major: B x S), for a
        task computed in segment groups (ring.py)."""
        def pick(ids):  # (B*S, n) -> (B*s, n)
            return ids.view(batch, -1, ids.shape[-1])[:, group].flatten(0, 1)

        return DocumentTask(pick(self.q_ids), pick(self.k_ids), self.packed)

    def sequences(self):
        """Varlen boundaries, one sequence per (row, document) (packed ids only; cached)."""
        if self._sequences is None:
            self._sequences = document_sequences(self.q_ids, self.k_ids)
        return self._sequences


class Documents:
    """Global document ids (B, N) of one call, on the inputs' device, plus a CPU copy for
    the per-task decisions (taken once per call; the model's layers share one through the
    cache below)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids.long()  # (B, N)
        self.cpu = self.ids.cpu()
        self.packed = bool((self.cpu[:, 1:] >= self.cpu[:, :-1]).all()) if self.cpu.shape[1] > 1 else True
        self._tasks: Dict[tuple, DocumentTask] = {}
        self._keeps: Dict[tuple, bool] = {}

    # ------------------------------------------------------------------- per task
    def task(self, plan: RingPlan, dst: int, task: Task, src: int) -> DocumentTask:
        """The ids of ``task`` run by ``dst`` on ``src``'s keys: (B*S, M) and (B*S, L)."""
        key = (plan.seq_len, plan.group_size, plan.layout, dst, task, src)  # pieces and selection
        if key not in self._tasks:
            qp, kp = plan.pieces[dst][task.q_piece], plan.pieces[src][task.k_piece]
            q = self._select(plan, qp, task)  # (B, S, M)
            k = self._select(plan, kp, task)  # (B, S, L)
            self._tasks[key] = DocumentTask(q.flatten(0, 1), k.flatten(0, 1), self.packed)
        return self._tasks[key]

    def _select(self, plan: RingPlan, piece: Piece, task: Task, ids: Optional[torch.Tensor] = None):
        ids = self.ids if ids is None else ids
        # plan.select reads a rank-local tensor; the global ids are "local" to offset 0
        return plan.select(ids, Piece(piece.start, piece.length, piece.start), task.pattern, task.offset)

    def keeps(self, plan: RingPlan, dst: int, task: Task, src: int) -> bool:
        """Can ``task`` hold an allowed pair? Exact for packed ids on undilated patterns,
        conservative otherwise (a kept task that turns out empty only costs its compute)."""
        key = (plan.seq_len, plan.group_size, plan.layout, dst, task, src)  # pieces and selection
        if key not in self._keeps:
            qp, kp = plan.pieces[dst][task.q_piece], plan.pieces[src][task.k_piece]
            q = self._select(plan, qp, task, self.cpu).flatten(1)  # (B, S*M)
            k = self._select(plan, kp, task, self.cpu).flatten(1)  # (B, S*L)
            if self.packed:  # each row's ids are runs: two id ranges meet iff their intervals do
                meet = (q.amin(1) <= k.amax(1)) & (k.amin(1) <= q.amax(1))
                self._keeps[key] = bool(meet.any())
            else:
                self._keeps[key] = any(bool(torch.isin(q[b], k[b]).any()) for b in range(q.shape[0]))
        return self._keeps[key]


@register_mask
class DocumentMask(AttentionMask):
    """Packed documents as a mask over the WHOLE sequence: a query sees only keys with its id.

    ``ids`` (B, N) global. The ring itself reads the ids through ``Documents`` (gathered over
    the group once per call, per task and per tile); this is the one-device view: the
    attention weights, the FlexAttention mask_mod and the checks of tests/unit/attention/test_masks.py."""

    kind = "documents"

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids.long()

    def keeps(self, q_range, k_range) -> bool:
        q, k = self.ids[:, q_range[0]:q_range[1]], self.ids[:, k_range[0]:k_range[1]]
        return any(bool(torch.isin(q[b], k[b]).any()) for b in range(q.shape[0]))

    def token_mask(self, qpos, kpos):
        ids = self.ids.to(qpos.device)
        return ids[:, qpos][:, :, :, None] == ids[:, kpos][:, :, None, :]  # (B, S, M, L)

    def mask_mod(self, device=None):
        ids = self.ids if device is None else self.ids.to(device)

        def mask_mod(b, h, q_idx, kv_idx):
            return ids[b, q_idx] == ids[b, kv_idx]

        return mask_mod


class DocumentPlan(FilteredPlan):
    """A RingPlan whose tasks (and so its transfers) skip pairs of pieces sharing no document."""

    def __init__(self, plan: RingPlan, documents: Documents) -> None:
        super().__init__(plan, documents.keeps)
        self.documents = documents

    def skipped_items(self, src: int, dst: int) -> List[Item]:
        """Slices the static plan would send from ``src`` to ``dst`` that no kept task reads."""
        kept = self.items(src, dst)
        return [it for it in self._plan.items(src, dst) if it not in kept]


def tensor_version(t: torch.Tensor) -> int:
    """In-place change counter (-1 for inference tensors, which keep none and cannot change)."""
    return -1 if t.is_inference() else t._version


class LastTensorCache:
    """One value derived from one tensor, kept until another tensor (or key) comes.

    The layers of a model call attention with the same ids tensor in one step, so what is
    derived from it (an all-gather, a CPU copy) happens once per step, not once per layer.
    The tensor is held by a weak reference and its in-place version is part of the key, so a
    new batch's tensor (possibly at the same address) or a changed one is never mistaken for it.
    """

    def __init__(self) -> None:
        self._entry: Optional[tuple] = None

    def get(self, t: torch.Tensor, key: tuple):
        entry = self._entry
        if entry is not None and entry[0]() is t and entry[1] == (tensor_version(t), key):
            return entry[2]
        return None

    def put(self, t: torch.Tensor, key: tuple, value):
        self._entry = (weakref.ref(t), (tensor_version(t), key), value)
        return value


_documents = LastTensorCache()


def documents_for(ids: torch.Tensor, group: Optional[dist.ProcessGroup], layout: str, world: int,
                  already_split: bool) -> Documents:
    """The call's Documents: ``ids`` as given (full sequence) or all-gathered from shards."""
    key = (id(group), layout, world, already_split)
    docs = _documents.get(ids, key)
    if docs is not None:
        return docs
    full = ids
    if already_split and world > 1:
        shards = [torch.empty_like(ids) for _ in range(world)]
        dist.all_gather(shards, ids.contiguous(), group=group)
        full = unshard_sequence(shards, layout, dim=1)  # (B, N)
    return _documents.put(ids, key, Documents(full))


def document_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions that restart at 0 in every document: a token's index among the earlier
    tokens of its row with the same id. (B, N) ids -> (B, N) long, any ids (packed or not)."""
    B, N = document_ids.shape
    order = torch.argsort(document_ids, dim=1, stable=True)  # tokens grouped by document, in order
    sorted_ids = torch.gather(document_ids, 1, order)
    idx = torch.arange(N, device=document_ids.device).expand(B, N)
    starts = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    positions = torch.empty_like(idx)
    positions.scatter_(1, order, idx - first)
    return positions
