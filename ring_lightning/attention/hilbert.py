"""HilbertRingAttention: the standard ring with every task's tiles visited along a Hilbert curve.

Exact attention over a set of keys does not depend on the order of the keys, so the curve
must not cost work. Tokens stay where they are (contiguous), and the curve orders the
tile SCHEDULE of a task instead: tile (i, j) of the query x key grid is visited in the
order of the curve of level ``hilbert_curve_level`` laid over that grid (grids of
``2^L x 2^L`` tiles one after another). Every kernel ``standard`` uses still runs, causal
tiles included, so results equal ``standard`` up to rounding and the speed is the same
(benchmarks/bench_attention.py measures it). The fused CUDA kernels own their tile
schedule; the portable kernel follows the curve, so consecutive tiles share a query or a
key tile.

``hilbert_order`` / ``hilbert_index`` / ``hilbert_cell`` are the curve itself (positions
of a 2-D grid of tokens in curve order), tested for being a bijection with unit steps.
"""

from __future__ import annotations

import torch

from functools import lru_cache
from typing import Tuple

from .base import RingAttentionBase
from .tasks import TaskPath


def hilbert_index(level: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Index along the Hilbert curve of the cells (x, y) of a 2^level x 2^level grid."""
    n = 1 << level
    x, y = x.clone(), y.clone()
    d = torch.zeros_like(x)
    s = n >> 1
    while s > 0:
        rx = ((x & s) > 0).long()
        ry = ((y & s) > 0).long()
        d += s * s * ((3 * rx) ^ ry)
        # rotate the quadrant so the sub-curve has the standard orientation
        flip = ry == 0
        swap_x = torch.where(flip & (rx == 1), s - 1 - x, x)
        swap_y = torch.where(flip & (rx == 1), s - 1 - y, y)
        x = torch.where(flip, swap_y, swap_x)
        y = torch.where(flip, swap_x, swap_y)
        s >>= 1
    return d


def hilbert_cell(level: int, d: torch.Tensor):
    """Inverse of ``hilbert_index``: grid cells (x, y) of curve indices ``d``."""
    n = 1 << level
    t = d.clone()
    x = torch.zeros_like(d)
    y = torch.zeros_like(d)
    s = 1
    while s < n:
        rx = (t // 2) & 1
        ry = (t ^ rx) & 1
        flip = ry == 0
        nx = torch.where(flip & (rx == 1), s - 1 - x, x)
        ny = torch.where(flip & (rx == 1), s - 1 - y, y)
        x, y = torch.where(flip, ny, nx), torch.where(flip, nx, ny)
        x = x + s * rx
        y = y + s * ry
        t = t // 4
        s <<= 1
    return x, y


def hilbert_order(positions: torch.Tensor, level: int) -> torch.Tensor:
    """Permutation that visits ``positions`` (1-D) in Hilbert-curve order."""
    side = 1 << level
    p = positions.long()
    key = (p // (side * side)) * side * side + hilbert_index(level, p % side, (p // side) % side)
    return torch.argsort(key, stable=True)


@lru_cache(maxsize=256)
def hilbert_tile_order(level: int, nq: int, nk: int) -> Tuple[Tuple[int, int], ...]:
    """The (query tile, key tile) grid of a task visited along the curve: grids of
    ``2^level x 2^level`` tiles one after another (row-major), the curve inside each."""
    side = 1 << level
    i, j = torch.meshgrid(torch.arange(nq), torch.arange(nk), indexing="ij")
    i, j = i.flatten(), j.flatten()
    grids_per_row = -(-nk // side)
    grid = (i // side) * grids_per_row + j // side
    key = grid * side * side + hilbert_index(level, j % side, i % side)
    order = torch.argsort(key, stable=True)
    return tuple(zip(i[order].tolist(), j[order].tolist()))


class HilbertPath(TaskPath):
    """The standard path with the task's tiles visited along a Hilbert curve.

    Tokens stay contiguous, so every kernel standard uses still runs (the fused CUDA
    kernels keep their own tile schedule); the portable kernel visits its tiles in curve
    order, so consecutive tiles share a query or a key tile (cache reuse).
    """

    def __init__(self, level: int) -> None:
        self.level = level

    def spec(self, ctx, task, src, batch):
        spec = super().spec(ctx, task, src, batch)
        level = self.level
        spec.tile_order = lambda nq, nk: hilbert_tile_order(level, nq, nk)
        return spec


class HilbertRingAttention(RingAttentionBase):
    """Exactly ``standard``'s results, tiles scheduled along a Hilbert curve."""

    variant = "hilbert"

    def _context_options(self, q: torch.Tensor, seq_len: int, is_causal: bool) -> dict:
        return {"path": HilbertPath(self.config.hilbert_curve_level)}
