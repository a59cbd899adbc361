"""BlockSparseRingAttention: attention restricted to a block mask, same on every rank.

The mask is a boolean ``(N/block_size, N/block_size)`` grid (True = kept) built
deterministically from the config, so every rank and every run derives the same one
without communication. ``sparsity_ratio`` is the fraction of blocks KEPT. The mask is
intersected with the dense/dilated pattern and, if causal, with the per-token causal
mask inside diagonal blocks. Work is skipped at two levels: a ring task (query piece x
key piece) whose mask keeps nothing is neither computed nor, if no task of that transfer
needs it, communicated... and inside a task the tiled kernel (tile = block_size) skips
every tile whose blocks were dropped, so compute is proportional to the kept blocks.

Patterns (``sparse_pattern``):
* ``local_window``: a band around the diagonal, as wide as the ratio allows;
* ``dilated``: every k-th block diagonal (k = round(1/ratio)), the main diagonal included;
* ``global_local``: the first blocks attend and are attended globally, plus a band;
* ``random``: the diagonal plus blocks drawn with ``sparse_seed``.
The diagonal is always kept so that every query has at least one key.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional

import torch

from .base import RingAttentionBase
from .kernels import BlockSpec
from .masks import BlockGridMask, block_mask_for
from .plan import CAUSAL
from .sparse_kernel import SparseLayout, aligned, build_layout, sparse_backward, sparse_forward
from .tasks import TaskPath, both


def _batched(tile_mask, batch: int, device):
    """A per-segment tile mask (S, mq, mk) -> (B*S, 1, mq, mk), broadcast over heads."""
    def batched(q0, q1, k0, k1):
        tm = tile_mask(q0, q1, k0, k1).to(device)  # (S, mq, mk)
        return tm.unsqueeze(0).expand(batch, *tm.shape).flatten(0, 1).unsqueeze(1)

    return batched


class BlockSparsePath(TaskPath):
    """Tasks under a block mask: the gathered kernel where whole blocks align (sparse_kernel.py),
    else the standard path with a per-tile token mask. Caches live for one ring call."""

    handles = frozenset({"block_grid"})

    def __init__(self, mask: BlockGridMask, device) -> None:
        self.mask, self.bs = mask, mask.block_size
        self.blocks = mask.on(device)  # (N/bs, N/bs) bool, on the inputs' device
        self._masks: Dict[tuple, object] = {}
        self._layouts: Dict[tuple, Optional[SparseLayout]] = {}

    def _tile_mask(self, ctx, task, src):
        """None: the mask keeps all of the task; False: nothing; else tile -> (S, mq, mk) mask."""
        key = (task, src)
        if key not in self._masks:
            blocks, bs, mask = self.blocks, self.bs, self.mask
            qpos, kpos = (p.to(blocks.device) for p in self.positions(ctx, task, src))  # (S, M), (S, L)
            sub = blocks[(qpos // bs).unique()][:, (kpos // bs).unique()]
            if bool(sub.all()):
                self._masks[key] = None
            elif not bool(sub.any()):
                self._masks[key] = False
            else:
                def tile(q0, q1, k0, k1):  # only one tile's mask at a time, never (M, L)
                    return mask.token_mask(qpos[:, q0:q1], kpos[:, k0:k1])[0]

                self._masks[key] = tile
        return self._masks[key]

    def _layout(self, ctx, task, src, spec: BlockSpec, q) -> Optional[SparseLayout]:
        """Gathered-kernel layout, or None where the per-tile path must run (dilated selection,
        blocks not aligned with pieces, dropout, packed documents, other masks)."""
        if (task.pattern.dilation != 1 or spec.dropout_p > 0 or spec.documents is not None
                or (ctx.masks is not None and ctx.masks.masks)):  # other masks: the per-tile path ANDs them
            return None
        Bp, _, heads, head_dim = q.shape  # (B*S, M, Hs, D)
        key = (task, src, Bp, heads, head_dim)
        if key not in self._layouts:
            qpos, kpos = self.positions(ctx, task, src)  # (S, M), (S, L)
            batch = Bp // qpos.shape[0]
            self._layouts[key] = (build_layout(self.blocks, qpos, kpos, self.bs, batch, task.kind == CAUSAL,
                                               heads, head_dim) if aligned(qpos, kpos, self.bs) else None)
        return self._layouts[key]

    def spec(self, ctx, task, src, batch):
        mask = self._tile_mask(ctx, task, src)
        if mask is False:
            return None
        spec = super().spec(ctx, task, src, batch)
        if mask is not None:
            spec.token_mask = both(spec.token_mask, _batched(mask, batch, ctx.device))
        return spec

    def forward(self, ctx, task, src, spec, q, k, v):
        layout = self._layout(ctx, task, src, spec, q)
        if layout is None:
            return super().forward(ctx, task, src, spec, q, k, v)
        o, l, state, computed = sparse_forward(layout, q, k, v, ctx.scale, ctx.kernels)
        ctx.profiler.computed_blocks += 1
        ctx.profiler.computed_tiles += computed
        return o, l, state

    def backward(self, ctx, task, src, spec, state, q, k, v, out, dout, lse):
        if state[0] != "sparse":
            return super().backward(ctx, task, src, spec, state, q, k, v, out, dout, lse)
        return sparse_backward(state, q, k, v, out, dout, lse, ctx.scale)


class BlockSparseRingAttention(RingAttentionBase):
    """Ring attention under a deterministic block mask; ``block_mask(seq_len)`` shows it."""

    variant = "block_sparse"

    def __init__(self, config=None, **fields) -> None:
        super().__init__(config, **fields)
        self._mask_of: dict = {}
        if self.config.compute_block_size != 1024:
            warnings.warn("RingAttentionConfig.compute_block_size has no effect in block_sparse: tiles are "
                          "block_size so they align with the mask's blocks", UserWarning, stacklevel=2)

    def block_mask(self, seq_len: int) -> torch.Tensor:
        """The boolean (N/block_size, N/block_size) block mask used for ``seq_len`` (True = kept)."""
        c = self.config
        # a copy: the mask is cached (masks.py) and shared by every module with this config
        return block_mask_for(seq_len, c.block_size, c.sparse_pattern, c.sparsity_ratio, c.sparse_seed).clone()

    def _grid_mask(self, seq_len: int) -> BlockGridMask:
        """The block mask as an attention mask (masks.py), built once per length: it keeps the
        copies on each device, so the pageable host copy is not repeated every call."""
        if self._mask_of.get("seq_len") != seq_len:
            c = self.config
            blocks = block_mask_for(seq_len, c.block_size, c.sparse_pattern, c.sparsity_ratio, c.sparse_seed)
            self._mask_of = {"seq_len": seq_len, "mask": BlockGridMask(blocks, c.block_size, (seq_len,) + self._sparse_key())}
        return self._mask_of["mask"]

    def _declared_masks(self, seq_len: int) -> tuple:
        return (self._grid_mask(seq_len),)

    def _context_options(self, q: torch.Tensor, seq_len: int, is_causal: bool) -> dict:
        # tiles of block_size so that every tile lies in one block of the mask
        return {"path": BlockSparsePath(self._grid_mask(seq_len), q.device), "tile": self.config.block_size}

    def _sparse_key(self):
        c = self.config
        return (c.block_size, c.sparse_pattern, c.sparsity_ratio, c.sparse_seed)
