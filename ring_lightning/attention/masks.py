"""Deterministic block masks of the block_sparse variant (pure functions of the config), and
``BlockGridMask``, the block grid as an attention mask (mask_protocol.py)."""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from ..sequence.lengths import LengthRules, check_length
from .mask_protocol import AttentionMask, register_mask


def _band(n: int, half_width: int) -> torch.Tensor:
    i = torch.arange(n)
    return (i[:, None] - i[None, :]).abs() <= half_width


@lru_cache(maxsize=32)
def build_block_mask(num_blocks: int, pattern: str, ratio: float, seed: int) -> torch.Tensor:
    """Deterministic (num_blocks, num_blocks) bool mask keeping about ``ratio`` of the blocks."""
    n = num_blocks
    budget = max(n, int(round(ratio * n * n)))  # at least the diagonal
    if pattern == "local_window":
        half = 0
        while half + 1 < n and _band(n, half + 1).sum().item() <= budget:
            half += 1
        return _band(n, half)
    if pattern == "dilated":
        stride = max(1, int(round(1.0 / ratio)))
        i = torch.arange(n)
        return ((i[:, None] - i[None, :]) % stride) == 0
    if pattern == "global_local":
        g = max(1, int(round(ratio * n / 4)))  # a quarter of the budget for global rows/columns
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[:g, :] = True
        mask[:, :g] = True
        half = 0
        while half + 1 < n and (mask | _band(n, half + 1)).sum().item() <= budget:
            half += 1
        return mask | _band(n, half)
    if pattern == "random":
        gen = torch.Generator().manual_seed(seed)
        mask = torch.eye(n, dtype=torch.bool)
        extra = budget - n
        if extra > 0:
            scores = torch.rand(n, n, generator=gen)
            scores[mask] = -1.0
            idx = torch.topk(scores.flatten(), extra).indices
            mask.view(-1)[idx] = True
        return mask
    raise ValueError(f"sparse_pattern={pattern!r} is not valid")


def block_mask_for(seq_len: int, block_size: int, pattern: str, ratio: float, seed: int) -> torch.Tensor:
    """The (N/block_size, N/block_size) mask of a sequence; ValueError with the length that
    works when ``seq_len`` is not a multiple of ``block_size``."""
    check_length(seq_len, LengthRules(block_size=block_size))
    return build_block_mask(seq_len // block_size, pattern, ratio, seed)


@register_mask
class BlockGridMask(AttentionMask):
    """Whole (query block, key block) pairs of ``block_size`` tokens kept where ``blocks`` is True."""

    kind = "block_grid"

    def __init__(self, blocks: torch.Tensor, block_size: int, key: Optional[tuple] = None) -> None:
        self.blocks, self.block_size = blocks.cpu(), block_size  # (N/bs, N/bs) bool: the plan reads it on the host
        self.key = key  #: hashable name of the grid (its config), for caches of masks built from it
        self._on = {str(self.blocks.device): self.blocks}

    def on(self, device) -> torch.Tensor:
        """The blocks on ``device``, copied there once (a copy from pageable host memory waits
        for the device: at 32K tokens it cost a quarter of the step, measured)."""
        if str(device) not in self._on:
            self._on[str(device)] = self.blocks.to(device)
        return self._on[str(device)]

    def keeps(self, q_range, k_range) -> bool:
        bs = self.block_size
        rows = slice(q_range[0] // bs, -(-q_range[1] // bs))
        cols = slice(k_range[0] // bs, -(-k_range[1] // bs))
        return bool(self.blocks[rows, cols].any())

    def token_mask(self, qpos, kpos):
        blocks, bs = self.on(qpos.device), self.block_size
        return blocks[(qpos // bs)[:, :, None], (kpos // bs)[:, None, :]][None]  # (1, S, M, L)

    def mask_mod(self, device=None):
        blocks, bs = self.on(device or "cpu"), self.block_size

        def mask_mod(b, h, q_idx, kv_idx):
            return blocks[q_idx // bs, kv_idx // bs]

        return mask_mod
