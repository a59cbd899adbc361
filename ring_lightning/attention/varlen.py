"""Variable-length attention with the log-sum-exp: FlashAttention's varlen kernel (CUDA).

Many independent sequences packed along one token axis, ``cu_q``/``cu_k`` their
boundaries (int32, length n+1). Forward returns ``(out, lse)`` per query token so the ring
can merge it; backward takes the FINAL merged out and lse, like every kernel here
(kernels.py). A sequence may have no query or no key tokens: such rows get out 0 and
lse -inf (the kernel itself reports +inf there).

Whether the kernel may take an input, and its refusals, are the module's ``KernelPolicy``
(kernel_policy.py). Users: packed documents (one sequence per document of a task, documents.py) and
block_sparse (one sequence per query block, its kept key blocks gathered, sparse_kernel.py).

Letters: Mt/Lt total query/key tokens, H heads, D head dim.
"""

from __future__ import annotations

from typing import Optional

import torch


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool,
                   key_counts: Optional[torch.Tensor] = None):
    """q (Mt, H, D); k, v (Lt, H, D) -> out (Mt, H, D), lse (Mt, H) float32, state.

    ``causal``: top-left aligned within each sequence (both sides hold the same positions).
    ``key_counts`` (n,) keys per sequence: rows of sequences without keys are fixed up.
    """
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
    if lse.dim() != 2:  # (n, H, max_q) on old builds: not the packed layout this code reads
        raise RuntimeError(f"unexpected varlen lse layout {tuple(lse.shape)}")
    lse_rows = lse.transpose(0, 1)  # (H, Mt) -> (Mt, H)
    if key_counts is not None:
        q_counts = cu_q[1:] - cu_q[:-1]
        empty = torch.repeat_interleave(key_counts == 0, q_counts.long(), output_size=q.shape[0])  # (Mt,)
        lse_rows = lse_rows.masked_fill(empty[:, None], float("-inf"))
        out = out.masked_fill(empty[:, None, None], 0.0)
    state = ("varlen", cu_q, cu_k, max_q, max_k, rng, unused, causal)
    return out, lse_rows, state


def varlen_backward(state, q, k, v, out, dout, lse_rows, scale: float):
    """(dq, dk, dv) given the FINAL merged out (Mt, H, D) and lse (Mt, H)."""
    _, cu_q, cu_k, max_q, max_k, rng, unused, causal = state
    # rows without any key anywhere carry lse -inf: +inf makes their probabilities 0
    lse = torch.where(torch.isneginf(lse_rows), torch.full_like(lse_rows, float("inf")), lse_rows)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.contiguous(), q, k, v, out.contiguous(), lse.float().transpose(0, 1).contiguous(), cu_q, cu_k,
        max_q, max_k, 0.0, causal, rng, unused, scale=scale)
    return dq, dk, dv


def document_sequences(q_ids: torch.Tensor, k_ids: torch.Tensor):
    """Packed (non-decreasing per row) ids (B', M) and (B', L) -> one sequence per (row, document).

    Flattened row-major, the query and key tokens are already grouped by (row, document)
    in the same order, so the sequences need no gather: only their boundaries. Returns
    ``(cu_q, cu_k, max_q, max_k, key_counts)``; a document present on one side only is a
    sequence with no tokens on the other.
    """
    Bp, M = q_ids.shape
    rows = torch.arange(Bp, device=q_ids.device)
    q_pairs = torch.stack([rows[:, None].expand_as(q_ids), q_ids], -1).flatten(0, 1)  # (B'*M, 2)
    k_pairs = torch.stack([rows[:, None].expand_as(k_ids), k_ids], -1).flatten(0, 1)  # (B'*L, 2)
    _, inverse = torch.unique(torch.cat([q_pairs, k_pairs]), dim=0, return_inverse=True)  # sorted pairs
    n = int(inverse.max()) + 1
    q_counts = torch.bincount(inverse[: q_pairs.shape[0]], minlength=n)
    k_counts = torch.bincount(inverse[q_pairs.shape[0]:], minlength=n)
    cu_q = torch.zeros(n + 1, dtype=torch.int32, device=q_ids.device)
    cu_k = torch.zeros(n + 1, dtype=torch.int32, device=q_ids.device)
    cu_q[1:], cu_k[1:] = torch.cumsum(q_counts, 0), torch.cumsum(k_counts, 0)
    return cu_q, cu_k, int(q_counts.max()), int(k_counts.max()), k_counts
