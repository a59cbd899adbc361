"""Block-sparse tasks at a cost proportional to the kept blocks (the block_sparse variant).

A task whose tokens are whole, contiguous blocks (dilation 1, block-aligned pieces) is
computed as:

* off-diagonal part: each query block with kept key blocks becomes one sequence of a
  variable-length attention call, its keys the concatenation of its kept key blocks
  (chunked so the gathered keys stay under a memory budget);
* diagonal part (causal tasks): the kept diagonal blocks, batched, with a causal mask
  (top-left aligned: the two sides hold the same positions).

Both parts are ``(out, lse)`` partials merged into the task's result with merge.py.
On CUDA (fp16/bf16) the variable-length call is FlashAttention's varlen kernel through
its ATen op (forward returns the log-sum-exp; backward takes the FINAL merged out/lse
like every other kernel here). Elsewhere it is emulated sequence by sequence with the
portable kernel, which keeps the gather/scatter logic tested on CPU.

Letters: B' batch x segments, M/L query/key tokens of the task, Hs heads, D head dim,
bs block size, nq/nk query/key blocks of the task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from . import varlen
from .kernel_policy import KernelPolicy
from .kernels import BlockSpec, block_backward, block_forward, math_backward, math_forward
from .merge import accumulator_dtype, merge_

GATHER_BUDGET_ELEMENTS = 1 << 28  # gathered keys per chunk (K and V each): 512 MiB in bf16


@dataclass
class SparseLayout:
    """Which query block attends to which key blocks, as flat block indices."""

    bs: int
    q_rows: torch.Tensor  #: (n,) flat query-block index (b*S*nq + s*nq + i) of each off-diag sequence
    k_blocks: torch.Tensor  #: (sum counts,) flat key-block indices, sequence after sequence
    counts: torch.Tensor  #: (n,) kept key blocks per sequence
    diag_q: torch.Tensor  #: (d,) flat query-block index of each kept diagonal block
    diag_k: torch.Tensor  #: (d,) flat key-block index of the same block
    chunks: List[tuple]  #: (seq start, seq end, key-block start, key-block end)


def aligned(qpos: torch.Tensor, kpos: torch.Tensor, bs: int) -> bool:
    """Tokens are whole contiguous blocks on both sides (the fast path applies)."""
    def ok(pos):
        M = pos.shape[1]
        return M % bs == 0 and bool((pos[:, 0] % bs == 0).all()) and bool(
            (pos[:, 1:] - pos[:, :-1] == 1).all())
    return ok(qpos) and ok(kpos)


def build_layout(blocks: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, bs: int, batch: int,
                 causal: bool, heads: int, head_dim: int) -> SparseLayout:
    S, M = qpos.shape
    nq, nk = M // bs, kpos.shape[1] // bs
    qb = (qpos[:, ::bs] // bs).to(blocks.device)  # (S, nq) global block ids
    kb = (kpos[:, ::bs] // bs).to(blocks.device)  # (S, nk)
    kept = blocks[qb[:, :, None], kb[:, None, :]]  # (S, nq, nk)
    if causal:
        diag = kept & (qb[:, :, None] == kb[:, None, :])
        off = kept & (kb[:, None, :] < qb[:, :, None])
    else:
        diag = torch.zeros_like(kept)
        off = kept
    off = off.unsqueeze(0).expand(batch, S, nq, nk).reshape(batch * S * nq, nk)  # rows: (b, s, i)
    counts = off.sum(1)
    rows = torch.nonzero(counts).flatten()
    seg_of_row = rows // nq  # b*S + s
    cols = off[rows].nonzero()  # (sum counts, 2): (sequence, key block j), row-major
    k_blocks = seg_of_row[cols[:, 0]] * nk + cols[:, 1]
    counts = counts[rows]
    d = diag.unsqueeze(0).expand(batch, S, nq, nk).reshape(batch * S * nq, nk).nonzero()
    diag_q = d[:, 0]
    diag_k = (d[:, 0] // nq) * nk + d[:, 1]
    # chunk the sequences so each call gathers at most the budget of key elements
    per_block = bs * heads * head_dim
    chunks, start, kstart, acc = [], 0, 0, 0
    offsets = torch.cumsum(counts, 0).tolist()
    for i, end_k in enumerate(offsets):
        n_blocks = end_k - (offsets[i - 1] if i else 0)
        if acc and (acc + n_blocks) * per_block > GATHER_BUDGET_ELEMENTS:
            chunks.append((start, i, kstart, kstart + acc))
            start, kstart, acc = i, kstart + acc, 0
        acc += n_blocks
    if acc:
        chunks.append((start, len(offsets), kstart, kstart + acc))
    return SparseLayout(bs, rows, k_blocks, counts, diag_q, diag_k, chunks)


def _varlen_forward(q, k, v, counts, bs, scale, policy: KernelPolicy):
    """q (n*bs, H, D); k, v (sum(counts)*bs, H, D) -> out (n*bs, H, D), lse (n, bs, H), state."""
    n = counts.numel()
    if policy.varlen_ok(q):
        def call():
            cu_q = torch.arange(0, n + 1, device=q.device, dtype=torch.int32) * bs
            cu_k = torch.zeros(n + 1, device=q.device, dtype=torch.int32)
            cu_k[1:] = torch.cumsum(counts, 0) * bs
            out, lse, state = varlen.varlen_forward(q, k, v, cu_q, cu_k, bs, int(counts.max()) * bs, scale, False)
            return out, lse.reshape(n, bs, -1), state

        result = policy.try_varlen(call, "block_sparse")
        if result is not None:
            return result
    # portable emulation, one sequence at a time
    outs, lses, pos = [], [], 0
    for i, c in enumerate(counts.tolist()):
        qi = q[i * bs:(i + 1) * bs].unsqueeze(0)
        ki, vi = k[pos:pos + c * bs].unsqueeze(0), v[pos:pos + c * bs].unsqueeze(0)
        o, l, _ = math_forward(qi, ki, vi, scale, BlockSpec(), tile=bs)
        outs.append(o[0])
        lses.append(l[0])
        pos += c * bs
    return torch.cat(outs), torch.stack(lses), ("math",)


def _varlen_backward(state, q, k, v, out, dout, lse_rows, counts, bs, scale):
    if state[0] == "varlen":
        return varlen.varlen_backward(state, q, k, v, out, dout, lse_rows.reshape(-1, lse_rows.shape[-1]), scale)
    dqs, dks, dvs, pos = [], [], [], 0
    for i, c in enumerate(counts.tolist()):
        sl = slice(i * bs, (i + 1) * bs)
        ki, vi = k[pos:pos + c * bs].unsqueeze(0), v[pos:pos + c * bs].unsqueeze(0)
        g = math_backward(q[sl].unsqueeze(0), ki, vi, out[sl].unsqueeze(0), dout[sl].unsqueeze(0),
                          lse_rows[i].unsqueeze(0), scale, BlockSpec(), tile=bs)
        dqs.append(g[0][0]); dks.append(g[1][0]); dvs.append(g[2][0])
        pos += c * bs
    return torch.cat(dqs), torch.cat(dks), torch.cat(dvs)


def _blocks(bs: int, *xs: torch.Tensor):
    """(B', M, ...) tensors -> (B'*M/bs, bs, ...): the task's tokens as flat blocks."""
    return tuple(x.reshape(-1, bs, *x.shape[2:]) for x in xs)


def sparse_forward(lay: SparseLayout, q, k, v, scale: float, policy: KernelPolicy):
    """(out (B',M,Hs,D), lse (B',M,Hs), state, computed blocks) of one aligned block-sparse task."""
    bs = lay.bs
    Bp, M, Hs, D = q.shape
    acc = accumulator_dtype(q.dtype)
    qb, kb, vb = _blocks(bs, q, k, v)  # (B'*nq, bs, Hs, D), (B'*nk, bs, Hs, D) x2: flat blocks
    out = torch.zeros(Bp * M // bs, bs, Hs, D, dtype=acc, device=q.device)
    lse = torch.full((Bp * M // bs, bs, Hs), float("-inf"), dtype=acc, device=q.device)
    states = []
    for s0, s1, k0, k1 in lay.chunks:
        rows, counts = lay.q_rows[s0:s1], lay.counts[s0:s1]
        kidx = lay.k_blocks[k0:k1]
        qc = qb[rows].reshape(-1, Hs, D)
        kc, vc = kb[kidx].reshape(-1, Hs, D), vb[kidx].reshape(-1, Hs, D)
        o, l, st = _varlen_forward(qc, kc, vc, counts, bs, scale, policy)
        out[rows] = o.reshape(-1, bs, Hs, D).to(acc)
        lse[rows] = l.to(acc)
        states.append(st)
    diag_state = None
    if lay.diag_q.numel():
        o, l, diag_state, _ = block_forward(qb[lay.diag_q], kb[lay.diag_k], vb[lay.diag_k], scale,
                                            BlockSpec(causal=True), policy, bs)
        part_o, part_l = out[lay.diag_q], lse[lay.diag_q]
        merge_(part_o, part_l, o, l)
        out[lay.diag_q], lse[lay.diag_q] = part_o, part_l
    computed = int(lay.counts.sum()) + int(lay.diag_q.numel())
    return out.reshape(Bp, M, Hs, D), lse.reshape(Bp, M, Hs), ("sparse", lay, states, diag_state), computed


def sparse_backward(saved, q, k, v, out, dout, lse, scale: float):
    _, lay, states, diag_state = saved
    bs = lay.bs
    Bp, M, Hs, D = q.shape
    acc = accumulator_dtype(q.dtype)
    qb, kb, vb, ob, dob, lb = _blocks(bs, q, k, v, out, dout, lse)  # (blocks, bs, Hs[, D])
    dq = torch.zeros(qb.shape, dtype=acc, device=q.device)
    dk = torch.zeros(kb.shape, dtype=acc, device=q.device)
    dv = torch.zeros(vb.shape, dtype=acc, device=q.device)
    for (s0, s1, k0, k1), st in zip(lay.chunks, states):
        rows, counts, kidx = lay.q_rows[s0:s1], lay.counts[s0:s1], lay.k_blocks[k0:k1]
        cast = (lambda x: x.to(q.dtype)) if st[0] == "varlen" else (lambda x: x)
        g = _varlen_backward(st, qb[rows].reshape(-1, Hs, D), kb[kidx].reshape(-1, Hs, D),
                             vb[kidx].reshape(-1, Hs, D), cast(ob[rows].reshape(-1, Hs, D)),
                             cast(dob[rows].reshape(-1, Hs, D)), lb[rows], counts, bs, scale)
        dq.index_add_(0, rows, g[0].reshape(-1, bs, Hs, D).to(acc))
        dk.index_add_(0, kidx, g[1].reshape(-1, bs, Hs, D).to(acc))  # duplicates add up
        dv.index_add_(0, kidx, g[2].reshape(-1, bs, Hs, D).to(acc))
    if diag_state is not None:
        gq, gk, gv = block_backward(diag_state, qb[lay.diag_q], kb[lay.diag_k], vb[lay.diag_k],
                                    ob[lay.diag_q], dob[lay.diag_q], lb[lay.diag_q], scale,
                                    BlockSpec(causal=True), bs)
        dq.index_add_(0, lay.diag_q, gq.to(acc))
        dk.index_add_(0, lay.diag_k, gk.to(acc))
        dv.index_add_(0, lay.diag_k, gv.to(acc))
    return dq.reshape(Bp, M, Hs, D), dk.reshape(k.shape), dv.reshape(v.shape)
