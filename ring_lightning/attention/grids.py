"""Token grids: a box neighbourhood on image / video patches, and the curve that packs it.

A sequence of ``N = prod(grid_shape)`` tokens is a grid ``(H, W)`` or ``(T, H, W)`` in raster
order (last dim fastest). With ``grid_window = r`` a query at cell ``c`` sees the keys at
cells ``c'`` with ``|c_d - c'_d| <= r_d`` in every dim (neighbourhood attention; causal
additionally keeps keys at raster positions <= the query's). In raster order such a window
is ``2 r_0 + 1`` short runs of keys per query row, spread over many key blocks; laid along
the generalised Hilbert curve of the grid (Cervený's "gilbert", any sizes, 2-D and 3-D),
a block of consecutive tokens is a compact patch, so the window of a query block touches
few key blocks, some of them full (docs/ARCHITECTURE.md, "Token grids", has the counts).
``frames`` (3-D) keeps frames in time order, each along its 2-D curve: better for windows
short in time and wide in space.

This file owns the grid maths; the hilbert variant (hilbert.py) uses it to order each
task's tokens and mask them, and ``flex_grid_mask`` is its one-GPU FlexAttention mask.
Exact attention over a set of keys does not depend on their order, so the outputs equal
the raster-order result; they are returned in the caller's order.

Letters: N tokens, d grid dims, nb blocks, bs block size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Tuple

import torch

from .mask_protocol import AttentionMask, register_mask

Vec = Tuple[int, ...]


# ------------------------------------------------------------------------------ the curve
def _sgn(v: Vec) -> Vec:
    return tuple((x > 0) - (x < 0) for x in v)


def _add(*vs: Vec) -> Vec:
    return tuple(sum(x) for x in zip(*vs))


def _neg(v: Vec) -> Vec:
    return tuple(-x for x in v)


def _half(v: Vec) -> Vec:
    return tuple(x // 2 for x in v)  # floor, as the published algorithm divides


def _size(v: Vec) -> int:
    return abs(sum(v))  # an axis vector has one non-zero component


def _even_half(v: Vec) -> Vec:
    """Half of axis ``v``, made even where that keeps the sub-curves' ends adjacent."""
    h = _half(v)
    return _add(h, _sgn(v)) if _size(h) % 2 and _size(v) > 2 else h


def _split2(p: Vec, a: Vec, b: Vec) -> List[tuple]:
    """Sub-boxes (origin, major axis, minor axis) of a 2-D box, in curve order."""
    w, h = _size(a), _size(b)
    da, db = _sgn(a), _sgn(b)
    if 2 * w > 3 * h:  # long box: two halves along the major axis
        a2 = _even_half(a)
        return [(p, a2, b), (_add(p, a2), _add(a, _neg(a2)), b)]
    b2 = _even_half(b)  # up the minor axis, along the whole major axis, back down
    return [(p, b2, _half(a)), (_add(p, b2), a, _add(b, _neg(b2))),
            (_add(p, a, _neg(da), b2, _neg(db)), _neg(b2), _neg(_add(a, _neg(_half(a)))))]


def _split3(p: Vec, a: Vec, b: Vec, c: Vec) -> List[tuple]:
    """Sub-boxes (origin, axes a, b, c) of a 3-D box, in curve order."""
    w, h, d = _size(a), _size(b), _size(c)
    da, db, dc = _sgn(a), _sgn(b), _sgn(c)
    a2, b2, c2 = _even_half(a), _even_half(b), _even_half(c)
    rest_a = _add(a, _neg(a2))
    if 2 * w > 3 * h and 2 * w > 3 * d:  # split along a only
        return [(p, a2, b, c), (_add(p, a2), rest_a, b, c)]
    if 3 * h > 4 * d:  # do not split along c
        return [(p, b2, c, a2), (_add(p, b2), a, _add(b, _neg(b2)), c),
                (_add(p, a, _neg(da), b2, _neg(db)), _neg(b2), c, _neg(rest_a))]
    if 3 * d > 4 * h:  # do not split along b
        return [(p, c2, a2, b), (_add(p, c2), a, b, _add(c, _neg(c2))),
                (_add(p, a, _neg(da), c2, _neg(dc)), _neg(c2), _neg(rest_a), b)]
    rest_b, rest_c = _add(b, _neg(b2)), _add(c, _neg(c2))
    return [(p, b2, c2, a2), (_add(p, b2), c, a2, rest_b),
            (_add(p, b2, _neg(db), c, _neg(dc)), a, _neg(b2), _neg(rest_c)),
            (_add(p, a, _neg(da), b2, c, _neg(dc)), _neg(c), _neg(rest_a), rest_b),
            (_add(p, a, _neg(da), b2, _neg(db)), _neg(b2), c2, _neg(rest_a))]


@lru_cache(maxsize=16)
def gilbert_cells(shape: Tuple[int, ...]) -> torch.Tensor:
    """Cells of a 2-D or 3-D grid in generalised-Hilbert order: (N, d) long, grid dim order.

    The recursion of J. Cervený's gilbert (github.com/jakubcerveny/gilbert), written for
    axis vectors of any dimension with an explicit stack. Consecutive cells are grid
    neighbours (one unit step) for 2-D grids and for 3-D grids of even sizes; dims of size
    1 are dropped and the curve runs over the rest.
    """
    live = [i for i, s in enumerate(shape) if s > 1]
    cells = torch.zeros(math.prod(shape), len(shape), dtype=torch.long)
    if not live:
        return cells
    sizes = [shape[i] for i in live]
    prefer = list(reversed(range(len(sizes))))  # ties go to the fastest dim, as raster order does
    major = max(prefer, key=lambda i: (sizes[i], -prefer.index(i)))
    axes = [major] + [i for i in prefer if i != major]

    def axis(i):
        return tuple(sizes[i] if j == i else 0 for j in range(len(sizes)))

    out: List[Vec] = []
    stack = [(tuple([0] * len(sizes)), *[axis(i) for i in axes])]
    while stack:
        p, *box = stack.pop()
        lengths = [_size(v) for v in box]
        long = [k for k, n in enumerate(lengths) if n > 1]
        if len(long) <= 1:  # a line (or one cell): walk it
            k = long[0] if long else 0
            step = _sgn(box[k])
            out.extend(tuple(x + i * s for x, s in zip(p, step)) for i in range(lengths[k]))
            continue
        parts = _split2(p, *box) if len(box) == 2 else _split3(p, *box)
        stack.extend(reversed(parts))
    cells[:, live] = torch.tensor(out, dtype=torch.long)
    return cells


# ------------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class TokenGrid:
    """A token grid, the window on it and the order the kernels see its tokens in."""

    shape: Tuple[int, ...]
    radius: Tuple[int, ...]
    order: str  #: "hilbert" | "frames" | "raster" (config.GRID_ORDERS)

    @classmethod
    def from_config(cls, config) -> Optional["TokenGrid"]:
        if config.grid_shape is None:
            return None
        return cls(tuple(config.grid_shape), tuple(config.grid_window), config.grid_order)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.shape)

    def check(self, seq_len: int) -> None:
        if seq_len != self.num_tokens:
            raise ValueError(
                f"grid_shape={list(self.shape)} holds {self.num_tokens} tokens but the sequence has {seq_len} "
                f"(all ranks together); prod(grid_shape) must equal the sequence length: one image or video "
                f"per row, patches in raster order (last dim fastest)")

    def coords(self, positions: torch.Tensor) -> torch.Tensor:
        """Raster positions (n,) -> grid cells (n, d)."""
        out, rest = [], positions.long()
        for s in reversed(self.shape):
            out.append(rest % s)
            rest = rest // s
        return torch.stack(out[::-1], dim=-1)

    def rank(self) -> torch.Tensor:
        """(N,) the index along the kernel order of every raster position."""
        if self.order == "hilbert":
            return _curve_rank(self.shape)
        if self.order == "frames":  # frame after frame, each along its own 2-D curve
            frame = math.prod(self.shape[1:])
            pos = torch.arange(self.num_tokens)
            return pos // frame * frame + _curve_rank(self.shape[1:])[pos % frame]
        return torch.arange(self.num_tokens)

    def kernel_order(self, positions: torch.Tensor) -> Optional[torch.Tensor]:
        """Permutation of ``positions`` (n,) into kernel order; None where it is the identity."""
        if self.order == "raster":
            return None  # positions of a task are increasing: raster order already
        return torch.argsort(self.rank()[positions.long()])

    def allowed(self, cq, ck, pq=None, pk=None) -> torch.Tensor:
        """(m, l) bool: cells cq (m, d) may see cells ck (l, d); with positions, causally too."""
        r = torch.tensor(self.radius, device=cq.device)
        ok = ((cq[:, None, :] - ck[None, :, :]).abs() <= r).all(-1)
        return ok if pq is None else ok & (pk[None, :] <= pq[:, None])

    def pieces_meet(self, q_range: Tuple[int, int], k_range: Tuple[int, int]) -> bool:
        """Can any query of raster range [s, e) see a key of another? (bounding boxes: never
        says no wrongly, so a dropped ring task really is empty)."""
        (qlo, qhi), (klo, khi) = _range_box(self, *q_range), _range_box(self, *k_range)
        return all(kl - qh <= r and ql - kh <= r for ql, qh, kl, kh, r in zip(qlo, qhi, klo, khi, self.radius))


@register_mask
class GridWindowMask(AttentionMask):
    """A query at grid cell c sees the keys at cells c' with ``|c_d - c'_d| <= radius[d]`` (grids.py)."""

    kind = "grid_window"
    #: a token grid is one image or video per row: packed documents cannot split it
    refuses_documents = ("document_ids cannot be combined with grid_shape: a token grid is one image or video "
                         "per row; pass document_ids=None or set grid_shape=None for packed 1-D documents")

    def __init__(self, grid: TokenGrid) -> None:
        self.grid = grid

    def keeps(self, q_range, k_range) -> bool:
        return self.grid.pieces_meet(q_range, k_range)

    def token_mask(self, qpos, kpos):
        S, M, L = qpos.shape[0], qpos.shape[1], kpos.shape[1]
        cq = self.grid.coords(qpos.reshape(-1)).view(S, M, 1, -1)
        ck = self.grid.coords(kpos.reshape(-1)).view(S, 1, L, -1)
        r = torch.tensor(self.grid.radius, device=qpos.device)
        return ((cq - ck).abs() <= r).all(-1)[None]  # (1, S, M, L)

    def flex_form(self, is_causal: bool, device):
        return flex_grid_mask(self.grid, is_causal, device)  # the window in curve order: few dense blocks

    def mask_mod(self, device=None):
        cells = self.grid.coords(torch.arange(self.grid.num_tokens, device=device))
        dims = [cells[:, i].contiguous() for i in range(cells.shape[1])]
        radius = self.grid.radius

        def mask_mod(b, h, q_idx, kv_idx):
            keep = q_idx >= 0
            for c, r in zip(dims, radius):
                keep = keep & (c[q_idx] - c[kv_idx] <= r) & (c[kv_idx] - c[q_idx] <= r)
            return keep

        return mask_mod


@lru_cache(maxsize=16)
def _curve_rank(shape: Tuple[int, ...]) -> torch.Tensor:
    cells = gilbert_cells(shape)  # (N, d) in curve order
    strides = torch.tensor([math.prod(shape[i + 1:]) for i in range(len(shape))])
    raster = (cells * strides).sum(-1)  # raster position of the i-th cell along the curve
    rank = torch.empty_like(raster)
    rank[raster] = torch.arange(raster.numel())
    return rank


@lru_cache(maxsize=256)
def _range_box(grid: TokenGrid, start: int, end: int) -> Tuple[Vec, Vec]:
    c = grid.coords(torch.arange(start, end))
    return tuple(c.amin(0).tolist()), tuple(c.amax(0).tolist())


# ----------------------------------------------------------------------------- block masks
_PAIR_BUDGET = 1 << 24  # token pairs one chunk of the exact block test holds


def window_block_masks(grid: TokenGrid, positions: torch.Tensor, block_size: int,
                       causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact (kept, full) block masks of the window over a token sequence, (nb, nb) bool each.

    ``positions`` (N,): the raster position of each token in sequence order (the kernel
    order). A block pair is kept if ANY of its token pairs is allowed and full if ALL are:
    what ``create_block_mask`` finds, without evaluating every pair. Per dim, the largest
    distance between two cell sets is set by their extremes, so full blocks come from the
    blocks' bounding boxes alone; the boxes also rule out most pairs, and only the
    remaining candidates are checked token by token (in chunks). A last partial block is
    padded with copies of its last token, which changes no any/all.
    """
    N = positions.numel()
    nb = -(-N // block_size)
    pad = nb * block_size - N
    pos = torch.cat([positions.long(), positions[-1:].long().expand(pad)]) if pad else positions.long()
    cells = grid.coords(pos).view(nb, block_size, -1)  # (nb, bs, d)
    lo, hi = cells.amin(1), cells.amax(1)  # (nb, d) bounding boxes
    r = torch.tensor(grid.radius, device=cells.device)
    near = ((lo[None] - hi[:, None] <= r) & (lo[:, None] - hi[None] <= r)).all(-1)  # (q block, k block)
    full = ((hi[:, None] - lo[None]).maximum(hi[None] - lo[:, None]) <= r).all(-1)
    pblk = pos.view(nb, block_size)
    if causal:
        near &= pblk.amin(1)[None, :] <= pblk.amax(1)[:, None]
        full &= pblk.amax(1)[None, :] <= pblk.amin(1)[:, None]
    todo = (near & ~full).nonzero()  # (P, 2) candidate pairs that need the token test
    kept = full.clone()
    chunk = max(1, _PAIR_BUDGET // (block_size * block_size))
    cells = cells.to(torch.int32)
    for i in range(0, todo.shape[0], chunk):
        a, b = todo[i:i + chunk, 0], todo[i:i + chunk, 1]
        ok = pblk[b][:, None, :] <= pblk[a][:, :, None] if causal else None  # (P, bs, bs)
        for dim, rd in enumerate(grid.radius):
            near_d = (cells[a, :, dim][:, :, None] - cells[b, :, dim][:, None, :]).abs() <= rd
            ok = near_d if ok is None else ok & near_d
        kept[a, b] = ok.flatten(1).any(1)
    return kept, full


def kernel_positions(grid: TokenGrid) -> torch.Tensor:
    """(N,) raster position of each token of the whole grid in kernel order."""
    rank = grid.rank()
    seq = torch.empty_like(rank)
    seq[rank] = torch.arange(rank.numel())
    return seq


# ------------------------------------------------------------------- one GPU: FlexAttention
_flex_masks: Dict[tuple, tuple] = {}  # (grid, causal, device) -> (kernel order, inverse, block mask)


def flex_grid_mask(grid: TokenGrid, causal: bool, device):
    """(order (N,), inverse (N,), FlexAttention block mask) of the window in kernel order:
    built once per (grid, causal, device) and kept for the process (it is static)."""
    key = (grid, bool(causal), str(device))
    if key not in _flex_masks:
        from .flex import FLEX_BLOCK, block_mask_from_blocks

        seq = kernel_positions(grid).to(device)
        kept, full = window_block_masks(grid, seq, FLEX_BLOCK, causal)  # on the device: fast at 64K tokens
        cells = grid.coords(seq)
        dims = [cells[:, i].contiguous() for i in range(cells.shape[1])]  # one (N,) tensor per dim
        pos = seq
        radius = grid.radius

        def mask_mod(b, h, q_idx, kv_idx):
            keep = q_idx >= 0  # all True, in the index dtype flex traces with
            if causal:
                keep = keep & (pos[kv_idx] <= pos[q_idx])
            for c, r in zip(dims, radius):
                keep = keep & (c[q_idx] - c[kv_idx] <= r) & (c[kv_idx] - c[q_idx] <= r)
            return keep

        mask = block_mask_from_blocks((kept & ~full)[None], full[None], mask_mod, seq.numel())
        order = None if grid.order == "raster" else seq
        inverse = None if order is None else grid.rank().to(device)
        _flex_masks[key] = (order, inverse, mask)
    return _flex_masks[key]
