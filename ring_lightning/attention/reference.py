"""Brute-force oracle: dense and LongNet-dilated attention from the definition.

Independent of the ring on purpose: no merge routine, no layouts, no kernels. It builds the
full boolean mask of every pattern from GLOBAL positions, concatenates the masked scores of
all patterns along the key axis and takes ONE softmax over the concatenation. That single
softmax equals the LongNet merge "weights proportional to each pattern's denominator"
(Ding et al. 2023; docs/ARCHITECTURE.md, the merge), so the ring's associative merge is checked against
a formula it does not share code with. Float64 by default; O(P * N^2) memory, tests only.

Letters: B batch, N sequence, H query heads, K kv heads, D head dim, P patterns.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch


def pattern_mask(
    seq_len: int, num_heads: int, segment: int, dilation: int, is_causal: bool, device=None
) -> torch.Tensor:
    """Boolean (H, N, N) mask of one (segment, dilation) pattern; True = query may see key."""
    t = torch.arange(seq_len, device=device)
    heads = torch.arange(num_heads, device=device)
    offset_h = heads % dilation  # (H,)
    selected = ((t % segment) % dilation)[None, :] == offset_h[:, None]  # (H, N)
    same_segment = (t[:, None] // segment) == (t[None, :] // segment)  # (N, N)
    mask = selected[:, :, None] & selected[:, None, :] & same_segment[None]
    if is_causal:
        mask &= (t[None, :] <= t[:, None])[None]
    return mask


def block_to_token_mask(block_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Expand a (N/bs, N/bs) block mask to an (N, N) token mask."""
    return block_mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)


def grid_window_mask(grid_shape: Sequence[int], radius: Sequence[int], device=None) -> torch.Tensor:
    """(N, N) box-neighbourhood mask of a token grid in raster order (last dim fastest): True
    where the two tokens' cells differ by at most ``radius[d]`` in every dim d."""
    idx = torch.arange(math.prod(grid_shape), device=device)
    cells = torch.stack(torch.unravel_index(idx, tuple(grid_shape)), dim=-1)  # (N, d)
    return ((cells[:, None] - cells[None]).abs() <= torch.tensor(list(radius), device=device)).all(-1)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    is_causal: bool = False,
    segment_lengths: Optional[Sequence[int]] = None,
    dilation_rates: Optional[Sequence[int]] = None,
    scale: Optional[float] = None,
    block_mask: Optional[torch.Tensor] = None,
    block_size: Optional[int] = None,
    dtype: torch.dtype = torch.float64,
    document_ids: Optional[torch.Tensor] = None,
    grid_shape: Optional[Sequence[int]] = None,
    grid_window: Optional[Sequence[int]] = None,
    masks: Sequence = (),
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the full sequence.

    Args:
        q: (B, N, H, D). k, v: (B, N, K, D) with H % K == 0 (grouped-query attention).
        is_causal: keep keys at positions <= the query's.
        segment_lengths, dilation_rates: LongNet patterns; None = dense. Segments longer
            than N are clamped to N.
        block_mask: optional (N/block_size, N/block_size) boolean mask ANDed into every pattern.
        document_ids: optional (B, N) ids: a query sees only keys with its id (every pattern).
        grid_shape, grid_window: optional token grid and box radius (``grid_window_mask``),
            ANDed into every pattern.
        masks: further masks (mask_protocol.AttentionMask) ANDed into every pattern through
            their ``dense`` answer: a mask kind without a definition here (the ones above are
            written out independently, and tests/unit/attention/test_masks.py checks the masks against them).
    Returns:
        out (B, N, H, D) and lse (B, N, H), in ``dtype``. Rows with no key: out 0, lse -inf.
    """
    B, N, H, D = q.shape
    K = k.shape[2]
    group = H // K
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = (x.to(dtype) for x in (q, k, v))
    k = k.repeat_interleave(group, dim=2)  # (B, N, H, D)
    v = v.repeat_interleave(group, dim=2)
    if segment_lengths is None:
        patterns = [(N, 1)]
    else:
        rates = dilation_rates or [1] * len(segment_lengths)
        patterns = [(min(w, N), r) for w, r in zip(segment_lengths, rates)]
    extra = None
    if block_mask is not None:
        extra = block_to_token_mask(block_mask.to(q.device), block_size)[None]  # (1, N, N)
    if grid_shape is not None:
        window = grid_window_mask(grid_shape, grid_window, q.device)[None]  # (1, N, N)
        extra = window if extra is None else extra & window
    for m in masks:
        dense = m.dense(N, q.device)  # (1|B, N, N)
        if dense.shape[0] > 1:
            raise ValueError("reference_attention(masks=...) takes masks shared by the rows; pass per-row "
                             "documents as document_ids")
        extra = dense if extra is None else extra & dense
    same_doc = None
    if document_ids is not None:
        ids = document_ids.to(q.device)
        same_doc = (ids[:, :, None] == ids[:, None, :])[:, None]  # (B, 1, N, N)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale  # (B, H, N, N)
    masked = []
    for w, r in patterns:
        mask = pattern_mask(N, H, w, r, is_causal, q.device)  # (H, N, N)
        if extra is not None:
            mask = mask & extra
        mask = mask[None] if same_doc is None else (mask[None] & same_doc)  # (1|B, H, N, N)
        masked.append(scores.masked_fill(~mask, float("-inf")))
    all_scores = torch.cat(masked, dim=-1)  # (B, H, N, P*N)
    lse = torch.logsumexp(all_scores, dim=-1)  # (B, H, N)
    probs = torch.exp(all_scores - lse[..., None]).nan_to_num(0.0)
    v_all = torch.cat([v] * len(patterns), dim=1)  # (B, P*N, H, D)
    out = torch.einsum("bhnm,bmhd->bnhd", probs, v_all)
    return out, lse.transpose(1, 2)  # (B, N, H, D), (B, N, H)
