"""Attention work, counted once: allowed (query, key) pairs and the FLOPs they cost.

The one definition behind every attention throughput number of the project: the
benchmarks' TFLOP/s, the model's ``flops_per_token`` and the training module's MFU.
torch only (no Lightning), so anything may import it.

Pairs. ``P`` = the (query, key) pairs a pattern lets attend, summed over query heads.
Grouped-query attention does not change ``P``: every query head scores its own keys.
Causal convention: a pair with key before query counts 1 and the pair of a token with
itself counts 1/2, so ``m`` mutually visible tokens count ``m^2 / 2`` and causal is
exactly half of non-causal for a symmetric pattern (dense causal: ``H * N^2 / 2``),
which is the usual "causal halves the FLOPs" rule.

Patterns, as ``ring_lightning.attention.reference.pattern_mask`` defines them (LongNet,
Ding et al. 2023): ``(w, r)`` cuts the sequence into ``N / w`` segments (``w`` clamped
to ``N``); head ``h`` keeps the positions ``t`` with ``(t mod w) mod r == h mod r``; a
query sees the kept keys of its own segment. Several patterns are separate attentions
whose outputs are merged afterwards (the merge is not counted), so their pairs add up.
A block mask (block-sparse attention) keeps whole ``(query block, key block)`` pairs and
is ANDed into every pattern, as in ``reference_attention``.

FLOPs. Forward = ``4 * D * P`` per sample: ``Q K^T`` and ``P V`` are one multiply-add
(2 FLOPs) per pair and head dim each. Backward = 2 x forward (``dV, dP, dQ, dK``: four
matmuls; the model-FLOPs count of MFU, PaLM appendix B) or 2.5 x forward when the kernel
recomputes the scores (five matmuls; FlashAttention's count, used by the benchmarks).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

# Elements one chunk of the block-mask count may hold, so that memory stays bounded
# (a few tens of MB) however long the sequence is.
_CHUNK_ELEMENTS = 1 << 21


# Dense bf16 tensor-core peaks (FLOP/s) by device-name substring, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def attention_pairs(
    seq_len: int,
    num_heads: int = 1,
    *,
    causal: bool = True,
    segment_lengths: Optional[Sequence[int]] = None,
    dilation_rates: Optional[Sequence[int]] = None,
    block_mask: Optional[torch.Tensor] = None,
    block_size: Optional[int] = None,
) -> float:
    """Number of (query, key) pairs an attention pattern allows, summed over query heads.

    The single counter of attention work in the project; FLOPs (``flops_from_pairs``) and
    density (``attention_fraction``) are derived from it. Exact, in the convention of the
    module docstring (causal: a token with itself counts 1/2).

    Args:
        seq_len: GLOBAL sequence length ``N`` (all ranks together), one sample.
        num_heads: query heads ``H`` (not kv heads). With dilation, head ``h`` uses offset
            ``h mod r``, so the count is not simply ``H`` times the count of head 0.
        causal: keys at positions <= the query's only.
        segment_lengths: LongNet segment lengths ``w`` (clamped to ``seq_len``); None =
            dense (one pattern ``(N, 1)``). ``seq_len`` must be a multiple of each.
        dilation_rates: one rate ``r`` per segment length (default all 1).
        block_mask: optional boolean ``(N / block_size, N / block_size)`` mask of kept
            (query block, key block) pairs, e.g. ``BlockSparseRingAttention.block_mask(N)``.
        block_size: tokens per block; required with ``block_mask`` and only with it.

    Returns:
        ``P`` as a float (integer-valued, or a half-integer sum when causal).

    Raises:
        ValueError: naming the argument that is inconsistent and how to fix it.

    Cost: ``O(number of segments + (N / block_size)^2)`` work, chunked memory; without a
    block mask ``O(N / min(segment_lengths))``, cheap enough to call every training step.
    """
    if not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if not isinstance(num_heads, int) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    patterns = _patterns(seq_len, segment_lengths, dilation_rates)
    mask, bs = _block_mask(seq_len, block_mask, block_size)
    return sum(_pattern_pairs(seq_len, num_heads, w, r, causal, mask, bs) for w, r in patterns)


def mask_pairs(seq_len: int, masks: Sequence, num_heads: int = 1, *, causal: bool = True) -> float:
    """Pairs that attention masks (``ring_lightning.attention.mask_protocol``: any registered
    kind, ANDed) allow on a dense pattern, summed over query heads, in this module's causal
    convention: counted from the masks' own ``token_mask`` answers, a chunk of query rows at
    a time, so a new mask kind is counted without code here.

    A mask holding per-row data (packed documents) gives the total of its rows. Cost
    ``O(N^2)`` time, bounded memory: for checks and short sequences; the closed forms above
    (block masks, ``grid_window_pairs``, ``batch_attention_pairs``) are the per-step counters.
    """
    from ring_lightning.attention.mask_protocol import MaskSet

    mask_set = MaskSet(masks)
    keys = torch.arange(seq_len)
    rows = max(1, _CHUNK_ELEMENTS // seq_len)
    total = 0.0
    for q0 in range(0, seq_len, rows):
        queries = keys[q0:q0 + rows]
        allowed = mask_set.token_mask(queries[None], keys[None])  # (1|B, 1, c, N) or None: all
        if allowed is None:
            allowed = torch.ones(1, 1, queries.numel(), seq_len, dtype=torch.bool)
        if causal:
            before = keys[None, :] < queries[:, None]  # (c, N)
            same = keys[None, :] == queries[:, None]
            total += float((allowed & before).sum()) + 0.5 * float((allowed & same).sum())
        else:
            total += float(allowed.sum())
    return total * num_heads


def attention_fraction(seq_len: int, num_heads: int = 1, *, causal: bool = True, **pattern) -> float:
    """``attention_pairs`` of a pattern over those of dense attention with the same ``causal``.

    Takes the keyword arguments of ``attention_pairs`` (``segment_lengths``,
    ``dilation_rates``, ``block_mask``, ``block_size``). 1.0 for dense; below 1 for a
    sparse pattern; may exceed 1 with several dilated patterns (each is its own attention).
    """
    dense = attention_pairs(seq_len, num_heads, causal=causal)
    return attention_pairs(seq_len, num_heads, causal=causal, **pattern) / dense


def flops_from_pairs(pairs: float, head_dim: int, batch: int = 1, *, backward: bool = True,
                     recompute: bool = True) -> float:
    """Attention FLOPs of ``pairs`` (query, key) pairs (from ``attention_pairs``).

    Forward ``4 * batch * head_dim * pairs``; with ``backward`` plus 2.5 x that when the
    kernel recomputes the scores in the backward (``recompute``, the benchmarks' hardware
    count) or 2 x that without (model FLOPs, as MFU counts them).
    """
    if head_dim <= 0 or batch <= 0:
        raise ValueError(f"head_dim and batch must be positive, got head_dim={head_dim}, batch={batch}")
    forward = 4.0 * batch * head_dim * pairs
    if not backward:
        return forward
    return forward * (1.0 + (2.5 if recompute else 2.0))


def grid_window_pairs(grid_shape: Sequence[int], radius: Sequence[int], num_heads: int = 1, *,
                      causal: bool = False) -> float:
    """Pairs a box window on a token grid allows (``RingAttentionConfig.grid_window``), summed
    over query heads: a query sees the cells within ``radius[d]`` of its own in every dim d.

    The window is a box, so the pairs are the product over dims of the pairs of a line of
    ``n`` cells within ``r``: ``sum_i (min(i + r, n - 1) - max(i - r, 0) + 1)``. The pattern is
    symmetric, so causal (raster order) is exactly half, in this module's convention.
    """
    if len(grid_shape) != len(radius):
        raise ValueError(f"radius needs one entry per grid dim, got grid_shape={list(grid_shape)}, "
                         f"radius={list(radius)}")
    pairs = float(num_heads)
    for n, r in zip(grid_shape, radius):
        i = torch.arange(int(n), dtype=torch.float64)
        pairs *= float(((i + r).clamp(max=n - 1) - (i - r).clamp(min=0) + 1).sum())
    return pairs / 2 if causal else pairs


PER_DOCUMENT = "per_document"  # PyTorch's per-document head-tail balancer (not a layout of sharding.py)


def causal_document_pairs_per_rank(document_lengths: Sequence[int], group_size: int, layout: str,
                                   num_heads: int = 1) -> List[float]:
    """Causal attention work of packed documents on each rank of a sequence-parallel group.

    A query at index ``j`` of its document sees ``j + 1/2`` keys (itself counting 1/2, as
    everywhere here), and counts on the rank that holds it. ``layout``: ``contiguous`` or
    ``zigzag`` (sharding.py, over the whole packed row), or ``per_document``: every document
    cut into ``2W`` chunks, rank ``r`` taking chunks ``r`` and ``2W-1-r`` of each, as PyTorch's
    ``_PerDocumentHeadTailLoadBalancer`` does (every length a multiple of ``2W``).

    Returns:
        ``W`` floats: allowed pairs of each rank's queries, summed over ``num_heads`` heads.
    """
    from ring_lightning.sequence.sharding import sequence_positions

    lengths = torch.tensor([int(n) for n in document_lengths], dtype=torch.int64)
    N, W = int(lengths.sum()), group_size
    starts = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)  # (N,) its document's start
    t = torch.arange(N)
    j = t - starts  # index inside the document
    if layout == PER_DOCUMENT:
        if bool((lengths % (2 * W)).any()):
            raise ValueError(f"the per-document balance cuts every document into 2W = {2 * W} chunks; "
                             f"document lengths must be multiples of {2 * W}")
        chunk = j // (torch.repeat_interleave(lengths, lengths) // (2 * W))
        rank = torch.where(chunk < W, chunk, 2 * W - 1 - chunk)
    else:  # the layouts of sharding.py: invert each rank's positions
        rank = torch.empty(N, dtype=torch.int64)
        for r in range(W):
            rank[sequence_positions(N, W, r, layout)] = r
    work = torch.zeros(W, dtype=torch.float64).index_add_(0, rank, j.double() + 0.5)
    return [num_heads * float(x) for x in work]


# ----------------------------------------------------------------------------- helpers
def _patterns(seq_len: int, segment_lengths, dilation_rates) -> List[Tuple[int, int]]:
    """The (segment, rate) pairs, segments clamped to ``seq_len``: the attention config's own."""
    from ring_lightning.attention.config import RingAttentionConfig

    return RingAttentionConfig(segment_lengths=segment_lengths, dilation_rates=dilation_rates).patterns(seq_len)


def _block_mask(seq_len: int, block_mask, block_size) -> Tuple[torch.Tensor, int]:
    """The block mask as CPU bool and its block size; no mask = one block of ``seq_len``."""
    if block_mask is None:
        if block_size is not None:
            raise ValueError("block_size is only used with block_mask; pass both or neither")
        return torch.ones(1, 1, dtype=torch.bool), seq_len
    if block_size is None or block_size <= 0 or seq_len % block_size:
        raise ValueError(f"block_mask needs a positive block_size dividing seq_len {seq_len}, "
                         f"got block_size={block_size!r}")
    nb = seq_len // block_size
    if tuple(block_mask.shape) != (nb, nb):
        raise ValueError(f"block_mask must have shape ({nb}, {nb}) = seq_len / block_size per side, "
                         f"got {tuple(block_mask.shape)}")
    return block_mask.detach().to("cpu").bool(), block_size


def _pattern_pairs(n: int, heads: int, w: int, r: int, causal: bool, mask: torch.Tensor, bs: int) -> float:
    """Pairs of one pattern ``(w, r)`` under a block mask of ``bs``-token blocks.

    Within a segment the kept keys of a head are mutually visible, so the pairs are
    ``sum over blocks a, b of c[a] * c[b] * weight(a, b)``, with ``c[a]`` the head's kept
    positions of the segment inside block ``a`` and ``weight`` the mask (causal: 1 below
    the diagonal, 1/2 on it, 0 above). A segment touches few consecutive blocks, so each
    segment's counts are a short row ``(K,)`` starting at its first block.
    """
    nseg = n // w
    seg = torch.arange(nseg, dtype=torch.int64)
    first = seg * w // bs  # (S,) first block each segment touches
    k_max = int(((seg * w + w - 1) // bs - first).max()) + 1  # blocks touched, at most
    j = torch.arange(k_max, dtype=torch.int64)
    blk = first[:, None] + j[None, :]  # (S, K) block of each slot; past the segment: count 0
    # the slot's positions relative to its segment start: [lo, hi)
    lo = (blk * bs - seg[:, None] * w).clamp(0, w)
    hi = ((blk + 1) * bs - seg[:, None] * w).clamp(0, w)
    n_off = min(r, heads)  # offsets that some head uses
    off = torch.arange(n_off, dtype=torch.int64)
    head_count = torch.tensor([len(range(o, heads, r)) for o in range(n_off)], dtype=torch.float64)

    def kept_below(x):  # (S, K, 1) -> (S, K, R): #{0 <= u < x : u mod r == offset}
        return ((x - off + r - 1) // r).clamp(min=0)

    counts = (kept_below(hi[..., None]) - kept_below(lo[..., None])).to(torch.float64)  # (S, K, R)
    blk = blk.clamp(max=mask.shape[0] - 1)  # slots past the last block have count 0 anyway
    # chunks of (segments, query slots, key slots) that stay below _CHUNK_ELEMENTS
    seg_chunk = max(1, _CHUNK_ELEMENTS // (k_max * k_max))
    row_chunk = max(1, _CHUNK_ELEMENTS // k_max)
    total = 0.0
    for s0 in range(0, nseg, seg_chunk):
        c, b = counts[s0:s0 + seg_chunk], blk[s0:s0 + seg_chunk]  # (s, K, R), (s, K)
        for i0 in range(0, k_max, row_chunk):
            qi = j[i0:i0 + row_chunk]  # query slots of this chunk
            weight = mask[b[:, qi, None], b[:, None, :]].to(torch.float64)  # (s, rows, K)
            if causal:  # key slot before the query slot: 1; the same slot: 1/2; after: 0
                rel = qi[:, None] - j[None, :]  # (rows, K)
                weight = weight * torch.where(rel > 0, 1.0, torch.where(rel == 0, 0.5, 0.0))
            seen = torch.bmm(weight, c)  # (s, rows, R): kept keys each query slot sees
            total += float((c[:, qi] * seen * head_count).sum())
    return total


# ------------------------------------------------------------------ the pairs of a batch
def batch_attention_pairs(
    seq_len: int,
    num_heads: int = 1,
    *,
    causal: bool = True,
    batch_size: int = 1,
    segment_lengths: Optional[Sequence[int]] = None,
    dilation_rates: Optional[Sequence[int]] = None,
    block_mask: Optional[torch.Tensor] = None,
    block_size: Optional[int] = None,
    document_ids: Optional[torch.Tensor] = None,
    grid_shape: Optional[Sequence[int]] = None,
    grid_window: Optional[Sequence[int]] = None,
) -> float:
    """Allowed (query, key) pairs of a whole batch under every mask the attention applies.

    ``attention_pairs`` for one pattern, plus what a training batch adds: packed documents
    (a query sees only keys with its own ``document_ids``, ANDed into every pattern, as in
    ``reference_attention``) and token grids (``grid_shape`` + ``grid_window``, causal in
    raster order; one image or video per row, so never with documents). What
    ``LongDocumentLM`` logs as ``perf/tflops_per_gpu`` and ``perf/mfu`` counts.

    Args:
        seq_len, num_heads, causal, segment_lengths, dilation_rates, block_mask, block_size:
            as in ``attention_pairs``.
        batch_size: samples, used when ``document_ids`` is None (every sample is alike).
        document_ids: optional (B, N) or (N,) integer ids of the WHOLE sequences (before
            sharding); pairs are summed over its rows.
        grid_shape, grid_window: a token grid and its box radius (one per grid dim); the
            grid excludes segments and block masks, as ``RingAttentionConfig`` does.

    Returns:
        ``P`` summed over the batch's samples (and query heads).

    Cost: ``O(B * N * patterns * rates)`` without a block mask or grid; with a block mask
    plus documents ``O(B * nnz * N / block_size)`` (nnz: non-empty (block, document) cells).
    """
    if document_ids is None:
        if grid_shape is not None:
            return batch_size * grid_window_pairs(grid_shape, grid_window, num_heads, causal=causal)
        return batch_size * attention_pairs(seq_len, num_heads, causal=causal, segment_lengths=segment_lengths,
                                            dilation_rates=dilation_rates, block_mask=block_mask,
                                            block_size=block_size)
    ids = document_ids.detach().to("cpu").reshape(-1, document_ids.shape[-1])  # (B, N)
    if ids.shape[1] != seq_len:
        raise ValueError(f"document_ids must hold the whole sequence of {seq_len} tokens, got {tuple(ids.shape)}")
    if grid_shape is not None:
        raise ValueError("document_ids cannot be combined with grid_shape (the attention refuses it too)")
    patterns = _patterns(seq_len, segment_lengths, dilation_rates)
    mask, bs = _block_mask(seq_len, block_mask, block_size)
    weight = mask.to(torch.float64)
    if causal:  # query block after key block: 1, the same block: 1/2 (m^2/2 inside it), before: 0
        weight = weight * (torch.tril(torch.ones_like(weight), -1) + 0.5 * torch.eye(weight.shape[0]))
    total = 0.0
    t = torch.arange(seq_len)
    for row in ids:
        doc = torch.unique(row, return_inverse=True)[1]  # ids -> 0..D-1 (an id may recur anywhere)
        num_docs = int(doc.max()) + 1
        for w, r in patterns:
            group = (t // w) * num_docs + doc  # tokens that may see each other: same segment and document
            phase = (t % w) % r
            for o in range(min(r, num_heads)):
                kept = phase == o
                total += len(range(o, num_heads, r)) * _group_pairs(group[kept], t[kept] // bs, weight)
    return total


def _group_pairs(group: torch.Tensor, block: torch.Tensor, weight: torch.Tensor) -> float:
    """``sum_g c_g^T W c_g``: ``c_g[a]`` the tokens of group ``g`` in block ``a`` (a group's tokens
    all see each other, the block weight ``W`` aside)."""
    if group.numel() == 0:
        return 0.0
    if weight.shape[0] == 1:  # one block: m^2 * W per group
        counts = torch.unique(group, return_counts=True)[1].to(torch.float64)
        return float(weight[0, 0] * (counts ** 2).sum())
    nb = weight.shape[0]
    cells, counts = torch.unique(group * nb + block, return_counts=True)  # the non-empty (group, block) cells
    g, a = torch.unique(cells // nb, return_inverse=True)[1], cells % nb
    total, rows = 0.0, max(1, _CHUNK_ELEMENTS // nb)
    for g0 in range(0, int(g.max()) + 1, rows):  # groups in chunks: (rows, nb) dense at a time
        sel = (g >= g0) & (g < g0 + rows)
        gi, ai, ci = g[sel] - g0, a[sel], counts[sel].to(torch.float64)
        c = torch.sparse_coo_tensor(torch.stack([gi, ai]), ci, (min(rows, int(g.max()) + 1 - g0), nb),
                                    check_invariants=False)
        seen = torch.sparse.mm(c, weight.T)  # (rows, nb): (W c_g)[a] for each group of the chunk
        total += float((ci * seen[gi, ai]).sum())
    return total
