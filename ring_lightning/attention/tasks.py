"""How one ring task is computed: the standard path, which the variants specialise.

A task (plan.py) is one pattern/offset's query piece against one key piece. The ring
(ring.py) hands a path the task's tokens already gathered, shaped (B*S, M, Hs, D) for q
and (B*S, L, Hs, D) for k and v, and merges what comes back; the path decides

* ``spec``: how the task's blocks are masked (causal, token mask, dropout), or ``None``
  when the mask keeps nothing, so the task is skipped without gathering its tokens;
* ``forward``: ``(out (B*S, M, Hs, D), lse (B*S, M, Hs), state)`` of the task alone;
* ``backward``: ``(dq, dk, dv)`` of the task, given the FINAL merged out and lse and the
  ``state`` its forward returned.

``TaskPath`` is the standard one: one block-kernel call (kernels.py) per task. The
hilbert variant reorders tokens around it (hilbert.py), block_sparse masks blocks and
takes a gathered kernel where blocks align (block_sparse.py). Either keeps ``standard``'s
numerics wherever it does not change the maths, because it calls this path.

Masks (mask_protocol.py): a path that computes a mask kind itself names it in ``handles``
(GridPath: the grid window in curve order; BlockSparsePath: the block grid, with its
gathered kernel); the variant's other masks reach every task as tile masks built from their
``token_mask`` answers (``ctx.masks``), ANDed with the path's own (``both``).

Letters: B batch, S segments of a task, M/L query/key tokens, Hs query heads, D head dim.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .kernels import BlockSpec, block_backward, block_forward
from .plan import CAUSAL, Task

# "RingContext" in annotations is ring.RingContext: named, not imported (ring.py imports this module)


def tile_masks(masks, qpos: torch.Tensor, kpos: torch.Tensor, batch: int):
    """Tile -> (B*S, 1, mq, mk) mask of ``masks`` (mask_protocol.MaskSet) over one task's global
    positions (S, M) / (S, L): only one tile's mask at a time, never (M, L)."""
    def tile(q0, q1, k0, k1):
        t = masks.token_mask(qpos[:, q0:q1], kpos[:, k0:k1])  # (1|B, S, mq, mk)
        return t.expand(batch, *t.shape[1:]).flatten(0, 1).unsqueeze(1)

    return tile


def both(first, second):
    """Two tile masks (None: allows all; a tensor or a tile function) ANDed."""
    if first is None or second is None:
        return second if first is None else first

    def at(m, q0, q1, k0, k1):
        return m(q0, q1, k0, k1) if callable(m) else m[..., q0:q1, k0:k1]

    return lambda q0, q1, k0, k1: at(first, q0, q1, k0, k1) & at(second, q0, q1, k0, k1)


class TaskPath:
    """The standard path: one block-kernel call per task, tiles of ``ctx.tile``."""

    #: mask kinds (mask_protocol.py) this path computes itself; the others' tile masks come
    #: from their ``token_mask`` answer (``ctx.masks``)
    handles: frozenset = frozenset()

    def spec(self, ctx: "RingContext", task: Task, src: int, batch: int) -> Optional[BlockSpec]:
        """How the task attends (``batch``: B, for masks that broadcast over it)."""
        plan = ctx.plan
        # one dropout seed per task, from what every call of this task shares, so that
        # backward regenerates exactly the forward's mask; behind an all-to-all (ulysses.py)
        # the ranks holding other heads of the same pieces draw other masks
        heads = (plan.head_offset,) if plan.head_offset else ()
        seed = hash((ctx.dropout_seed, task.pattern.index, task.offset,
                     plan.pieces[ctx.rank][task.q_piece].start,
                     plan.pieces[src][task.k_piece].start) + heads) % (2**62)
        documents = None if ctx.documents is None else ctx.documents.task(plan, ctx.rank, task, src)
        token_mask = None
        if ctx.masks is not None and ctx.masks.masks:
            qpos, kpos = (p.to(ctx.device) for p in self.positions(ctx, task, src))
            token_mask = tile_masks(ctx.masks, qpos, kpos, batch)
        return BlockSpec(task.kind == CAUSAL, token_mask, ctx.dropout_p, seed, documents)

    def forward(self, ctx: "RingContext", task: Task, src: int, spec: BlockSpec, q, k, v):
        o, l, state, skipped = block_forward(q, k, v, ctx.scale, spec, ctx.kernels, ctx.tile)
        prof = ctx.profiler
        prof.computed_blocks += 1
        prof.skipped_blocks += skipped
        tiles = -(-q.shape[1] // ctx.tile) * -(-k.shape[1] // ctx.tile)
        # a CUDA kernel skips masked tiles inside itself: only the math kernel can count them
        prof.computed_tiles += tiles - skipped if state[0] == "math" else tiles
        return o, l, state

    def backward(self, ctx: "RingContext", task: Task, src: int, spec: BlockSpec, state, q, k, v,
                 out, dout, lse):
        return block_backward(state, q, k, v, out, dout, lse, ctx.scale, spec, ctx.tile)

    @staticmethod
    def positions(ctx: "RingContext", task: Task, src: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Global positions of the task's query tokens (S, M) and key tokens (S, L)."""
        plan = ctx.plan
        return (plan.positions(ctx.rank, task.q_piece, task.pattern, task.offset),
                plan.positions(src, task.k_piece, task.pattern, task.offset))
