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

import torch

from .base import RingAttentionBase
from .masks import build_block_mask


class BlockSparseRingAttention(RingAttentionBase):
    """Ring attention under a deterministic block mask; ``block_mask(seq_len)`` shows it."""

    variant = "block_sparse"

    def __init__(self, config=None, **fields) -> None:
        super().__init__(config, **fields)
        if self.config.compute_block_size != 1024:
            warnings.warn("RingAttentionConfig.compute_block_size has no effect in block_sparse: tiles are "
                          "block_size so they align with the mask's blocks", UserWarning, stacklevel=2)

    def block_mask(self, seq_len: int) -> torch.Tensor:
        """The boolean (N/block_size, N/block_size) block mask used for ``seq_len`` (True = kept)."""
        bs = self.config.block_size
        if seq_len % bs != 0:
            raise ValueError(
                f"sequence length {seq_len} is not a multiple of block_size {bs}; pad "
                f"{(-seq_len) % bs} more positions (ring_lightning.sharding.pad_to_multiple(x, {bs}))"
            )
        c = self.config
        return build_block_mask(seq_len // bs, c.sparse_pattern, c.sparsity_ratio, c.sparse_seed).clone()

    def _context_options(self, q: torch.Tensor, seq_len: int, is_causal: bool) -> dict:
        bs = self.config.block_size
        blocks = self.block_mask(seq_len).to(q.device)

        def mask_fn(qpos: torch.Tensor, kpos: torch.Tensor):
            qb, kb = (qpos // bs).to(q.device), (kpos // bs).to(q.device)  # (S, M), (S, L) block ids
            sub = blocks[qb.unique()][:, kb.unique()]
            if bool(sub.all()):
                return None
            if not bool(sub.any()):
                return False

            def tile(q0, q1, k0, k1):  # (S, mq, mk): only one tile's mask at a time
                return blocks[qb[:, q0:q1, None], kb[:, None, k0:k1]]

            tile.per_segment = True
            return tile

        return {"mask_fn": mask_fn, "tile": bs, "sparse_blocks": (blocks, bs)}

    def _sparse_key(self):
        c = self.config
        return (c.block_size, c.sparse_pattern, c.sparsity_ratio, c.sparse_seed)
