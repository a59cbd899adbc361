"""The brute-force count of allowed attention pairs, from the float64 reference's masks: the
oracle the FLOPs counters (ring_lightning/models/flops.py) and the logged MFU are checked against."""

from __future__ import annotations

import torch

from ring_lightning.attention.reference import block_to_token_mask, grid_window_mask, pattern_mask


def brute_pairs(n, heads, causal=True, segments=None, rates=None, block_mask=None, block_size=None,
                document_ids=None, grid=None, window=None) -> float:
    """Allowed (query, key) pairs over every head, summed over the rows of ``document_ids`` (B, N)
    (one document per row without them); causal: a key before the query counts 1, itself 1/2."""
    rows = document_ids if document_ids is not None else torch.zeros(1, n, dtype=torch.long)
    patterns = [(n, 1)] if segments is None else [(min(w, n), r) for w, r in zip(segments, rates)]
    t = torch.arange(n)
    total = 0.0
    for ids in rows:
        for w, r in patterns:
            mask = pattern_mask(n, heads, w, r, is_causal=False) & (ids[:, None] == ids[None, :])[None]  # (H, N, N)
            if block_mask is not None:
                mask &= block_to_token_mask(block_mask, block_size)[None]
            if grid is not None:
                mask &= grid_window_mask(grid, window)[None]
            if causal:
                total += (mask & (t[None, :] < t[:, None])).sum().item() + (mask & (t[None, :] == t[:, None])).sum().item() / 2
            else:
                total += mask.sum().item()
    return total
