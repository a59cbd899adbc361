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

Token grids (``grid_shape`` + ``grid_window``, grids.py) give the curve its real job: each
task's tokens are laid along the generalised Hilbert curve of the image / video grid
before its kernel runs (``GridPath``), so the box neighbourhood of a query tile is a few
key tiles; tiles the window empties are skipped, and ring tasks whose pieces are out of
each other's reach are neither computed nor sent (``GridWindowMask.keeps``). On one CUDA device the
whole call is one FlexAttention call under the window's block mask in curve order.
Outputs and gradients come back in the caller's order.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Dict, Optional, Tuple

import torch

from .base import RingAttentionBase
from .grids import GridWindowMask, TokenGrid
from .mask_protocol import CausalMask, MaskSet
from .plan import CAUSAL
from .tasks import TaskPath, both


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


class _GridTask:
    """One task's tokens in kernel order: the permutations and the positions its masks read
    (the window, and causality on raster positions for a diagonal task), on the inputs' device."""

    def __init__(self, grid: TokenGrid, qpos: torch.Tensor, kpos: torch.Tensor, causal: bool, device) -> None:
        self.q_order, self.k_order = grid.kernel_order(qpos), grid.kernel_order(kpos)  # None: identity
        if self.q_order is not None:
            qpos, kpos = qpos[self.q_order], kpos[self.k_order]
            self.q_order, self.k_order = self.q_order.to(device), self.k_order.to(device)
            self.q_back, self.k_back = torch.argsort(self.q_order), torch.argsort(self.k_order)
        self.masks = MaskSet([GridWindowMask(grid)] + ([CausalMask()] if causal else []))
        self.pq, self.pk = qpos.to(device)[None], kpos.to(device)[None]  # (1, M), (1, L)

    def tile_mask(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """(mq, mk) mask of one tile, from the masks (mask_protocol.py)."""
        return self.masks.token_mask(self.pq[:, q0:q1], self.pk[:, k0:k1])[0, 0]

    def queries(self, x: torch.Tensor, back: bool = False) -> torch.Tensor:
        """(B', M, ...) tensor of the task's queries into kernel order (``back``: out of it)."""
        return x if self.q_order is None else x.index_select(1, self.q_back if back else self.q_order)

    def keys(self, x: torch.Tensor, back: bool = False) -> torch.Tensor:
        return x if self.k_order is None else x.index_select(1, self.k_back if back else self.k_order)


class GridPath(TaskPath):
    """Tasks under a token-grid window: tokens in curve order inside the task, the window as
    a per-tile token mask (tiles it empties are skipped), results back in the task's order."""

    handles = frozenset({"grid_window"})

    def __init__(self, grid: TokenGrid) -> None:
        self.grid = grid
        self._tasks: Dict[tuple, _GridTask] = {}  # per ring call

    def _task(self, ctx, task, src) -> _GridTask:
        if (task, src) not in self._tasks:
            qpos, kpos = self.positions(ctx, task, src)  # (1, M), (1, L): dense patterns only
            self._tasks[(task, src)] = _GridTask(self.grid, qpos[0], kpos[0], task.kind == CAUSAL, ctx.device)
        return self._tasks[(task, src)]

    def spec(self, ctx, task, src, batch):
        spec = super().spec(ctx, task, src, batch)
        spec.causal = False  # in curve order causality is not triangular: the token mask holds it
        spec.token_mask = both(spec.token_mask, self._task(ctx, task, src).tile_mask)
        return spec

    def forward(self, ctx, task, src, spec, q, k, v):
        t = self._task(ctx, task, src)
        o, l, state = super().forward(ctx, task, src, spec, t.queries(q), t.keys(k), t.keys(v))
        return t.queries(o, back=True), t.queries(l, back=True), state

    def backward(self, ctx, task, src, spec, state, q, k, v, out, dout, lse):
        t = self._task(ctx, task, src)
        dq, dk, dv = super().backward(ctx, task, src, spec, state, t.queries(q), t.keys(k), t.keys(v),
                                      t.queries(out), t.queries(dout), t.queries(lse))
        return t.queries(dq, back=True), t.keys(dk, back=True), t.keys(dv, back=True)


class HilbertRingAttention(RingAttentionBase):
    """Exactly ``standard``'s results, tiles scheduled along a Hilbert curve; with a token grid,
    attention within a box window on it, tokens in curve order (grids.py)."""

    variant = "hilbert"

    def __init__(self, config=None, **fields) -> None:
        super().__init__(config, **fields)
        self._grid = TokenGrid.from_config(self.config)
        if self._grid is not None and self.config.hilbert_curve_level != type(self.config).hilbert_curve_level:
            warnings.warn("RingAttentionConfig.hilbert_curve_level has no effect with grid_shape: the curve "
                          "runs over the token grid", UserWarning, stacklevel=2)

    def _declared_masks(self, seq_len: int) -> tuple:
        grid = self._grid_for(seq_len)
        return () if grid is None else (GridWindowMask(grid),)

    def _grid_for(self, seq_len: int) -> Optional[TokenGrid]:
        if self._grid is not None:
            self._grid.check(seq_len)
        return self._grid

    def _context_options(self, q: torch.Tensor, seq_len: int, is_causal: bool) -> dict:
        grid = self._grid_for(seq_len)
        return {"path": HilbertPath(self.config.hilbert_curve_level) if grid is None else GridPath(grid)}
