"""HilbertRingAttention: the standard ring, tokens processed in Hilbert-curve order.

Inside every task the query and key tokens are reordered along a Hilbert curve of level
``L``: a token's position ``p`` is laid on a ``2^L x 2^L`` grid (column ``p mod 2^L``, row
``(p div 2^L) mod 2^L``, consecutive grids one after another) and tokens are visited in
curve order. Masks are computed from the ORIGINAL positions and the order is undone on the
output and on the gradients, so results equal ``standard`` for every input, causal
included (tests check this to 1e-6).

Where it helps, where it does not (measured; see README): exact attention over a set of
keys does not depend on their order, so for unmasked blocks the reorder is pure overhead
(two gathers). Under a causal mask the curve scatters the diagonal across the tile grid,
so fewer tiles can be skipped and the fast fused kernels (which only know a top-left
triangle) cannot be used: the masked portable kernel runs instead. The variant is kept
because the usage guide promises it and because it is exact; choose ``standard`` for speed.
"""

from __future__ import annotations

import torch

from .base import RingAttentionBase
from .kernels import BlockSpec
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


class HilbertPath(TaskPath):
    """The standard path on the task's tokens permuted into curve order, then permuted back."""

    def __init__(self, level: int) -> None:
        self.level = level

    def _order(self, ctx, task, src, spec: BlockSpec):
        """(query order (M,), key order (L,), spec with the causal mask made explicit).

        The causal mask is rebuilt from the ORIGINAL positions of the permuted tokens: the
        kernels' top-left triangle no longer describes it. Segment 0's relative positions
        serve every segment of a task (all segments are laid out alike).
        """
        qpos, kpos = (p[0] for p in self.positions(ctx, task, src))  # (M,), (L,)
        qo, ko = hilbert_order(qpos, self.level), hilbert_order(kpos, self.level)
        if spec.causal:
            qp, kp = qpos[qo].to(ctx.device), kpos[ko].to(ctx.device)  # positions in processing order

            def causal_tile(q0, q1, k0, k1):
                return kp[None, k0:k1] <= qp[q0:q1, None]  # (mq, mk)

            spec = BlockSpec(False, causal_tile, spec.dropout_p, spec.dropout_seed)
        return qo, ko, spec

    def forward(self, ctx, task, src, spec, q, k, v):
        qo, ko, spec = self._order(ctx, task, src, spec)
        o, l, state = super().forward(ctx, task, src, spec, q[:, qo], k[:, ko], v[:, ko])
        inv = torch.argsort(qo)  # undo the order: position i of the task gets its own row
        return o[:, inv], l[:, inv], state

    def backward(self, ctx, task, src, spec, state, q, k, v, out, dout, lse):
        qo, ko, spec = self._order(ctx, task, src, spec)
        gq, gk, gv = super().backward(ctx, task, src, spec, state, q[:, qo], k[:, ko], v[:, ko],
                                      out[:, qo], dout[:, qo], lse[:, qo])
        return gq[:, torch.argsort(qo)], gk[:, torch.argsort(ko)], gv[:, torch.argsort(ko)]


class HilbertRingAttention(RingAttentionBase):
    """Exactly ``standard``'s results, computed in Hilbert-curve token order."""

    variant = "hilbert"

    def _context_options(self, q: torch.Tensor, seq_len: int, is_causal: bool) -> dict:
        return {"path": HilbertPath(self.config.hilbert_curve_level)}
