"""One CUDA device, a mask that is not plain dense/causal: FlexAttention with a cached block mask.

On one device a dense-pattern call is a single task whose result is final, so no merge
and no final-lse backward are needed, and FlexAttention (Dong et al. 2024; PyTorch's
``torch.nn.attention.flex_attention``) can take the whole call with autograd: its block
mask skips empty blocks and runs full blocks without masking. Used for packed documents
and for block_sparse's block grid (or both); the ring path (several ranks, dilated
patterns, CPU) keeps the task kernels (kernels.py, varlen.py, sparse_kernel.py).

Block masks are built once and cached: the block grid's per (grid, causal, length,
device), the documents' per batch (the layers of one step share it, as documents.py's
ids do). Letters: B batch, N length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch

from .documents import DocumentMask, tensor_version
from .mask_protocol import CausalMask, MaskSet
from .masks import BlockGridMask

FLEX_BLOCK = 128  # FlexAttention's block (tokens) for the block masks built here

_compiled = None
_doc_masks: Optional[tuple] = None  # (weakref to the ids, key, block mask): one step's


@functools.lru_cache(maxsize=1)
def flex_importable() -> bool:
    """FlexAttention exists in this PyTorch (route.py asks, with the device and dtype apart)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        # compiled once per process: eager FlexAttention materialises the scores
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _mask_mod(causal: bool, blocks: Optional[torch.Tensor], block_size: int, ids: Optional[torch.Tensor]):
    """The mask_mod of (causal) AND (block grid) AND (same document), asked of the masks
    (mask_protocol.py), reading tensors on the device of ``blocks`` / ``ids``."""
    masks = ([CausalMask()] if causal else []) + ([BlockGridMask(blocks, block_size)] if blocks is not None else [])
    masks += [DocumentMask(ids)] if ids is not None else []
    device = ids.device if ids is not None else (blocks.device if blocks is not None else None)
    return MaskSet(masks).mask_mod(device)


def _create(causal, blocks, block_size, ids, B, N, device):
    return block_mask_of(_mask_mod(causal, blocks, block_size, ids), B, N, device)


def block_mask_of(mask_mod, B: Optional[int], N: int, device):
    """The block mask of any ``mask_mod`` (mask_protocol.MaskSet.mask_mod), not cached: the
    generic form for mask kinds without a cached builder here."""
    from torch.nn.attention.flex_attention import create_block_mask

    # _compile: the mask is evaluated block by block, never as a (B, N, N) tensor
    return create_block_mask(mask_mod, B, None, N, N, device=device, BLOCK_SIZE=FLEX_BLOCK, _compile=True)


_grid_masks: dict = {}  # (grid key, N, causal, device) -> block mask: static, kept for the process


def block_mask_for(N: int, causal: bool, device, grid: Optional[tuple] = None,
                   document_ids: Optional[torch.Tensor] = None):
    """The FlexAttention block mask of (causal) AND (block grid) AND (same document).

    ``grid``: ``(key, bs, make_blocks)``, ``key`` hashable and naming the grid (block_sparse
    passes its config), ``make_blocks()`` the (N/bs, N/bs) bool grid: built once per grid.
    """
    global _doc_masks
    bs = grid[1] if grid is not None else 1
    if document_ids is None:
        if grid is None:
            raise ValueError("block_mask_for needs a block grid or document ids")
        key = (grid[0], N, causal, str(device))
        if key not in _grid_masks:
            _grid_masks[key] = _create(causal, grid[2](), bs, None, None, N, device)
        return _grid_masks[key]
    key = (tensor_version(document_ids), N, causal, None if grid is None else grid[0])
    if _doc_masks is not None and _doc_masks[0]() is document_ids and _doc_masks[1] == key:
        return _doc_masks[2]
    blocks = grid[2]() if grid is not None else None
    ids = document_ids.long()
    if blocks is None and N % FLEX_BLOCK == 0 and bool((ids[:, 1:] >= ids[:, :-1]).all()):
        mask = packed_document_mask(ids, causal)
    else:
        mask = _create(causal, blocks, bs, ids, ids.shape[0], N, device)
    _doc_masks = (weakref.ref(document_ids), key, mask)
    return mask


def packed_document_mask(ids: torch.Tensor, causal: bool):
    """The block mask of packed documents (ids non-decreasing along each row), from block
    summaries instead of evaluating the mask on every (query, key) pair.

    A block of a packed row holds the ids [first, last]; two blocks share a document iff
    those ranges meet (disjoint ranges of one non-decreasing row meet only at a shared id),
    and every pair is allowed iff both hold one and the same id (below the diagonal when
    causal). So kept and full blocks are exactly what ``create_block_mask`` finds, in
    O((N/128)^2) work instead of O(N^2): 43 ms a step at 128K tokens on an H200 (measured,
    benchmarks/bench_masks.py) becomes about a millisecond.
    """
    B, N = ids.shape
    nb = N // FLEX_BLOCK
    blk = ids.view(B, nb, FLEX_BLOCK)  # (B, N) -> (B, blocks, 128)
    lo, hi = blk[..., 0], blk[..., -1]  # (B, blocks): a packed block's smallest and largest id
    meet = (lo[:, :, None] <= hi[:, None, :]) & (lo[:, None, :] <= hi[:, :, None])  # (B, q blocks, kv blocks)
    one = lo == hi
    full = one[:, :, None] & one[:, None, :] & (lo[:, :, None] == lo[:, None, :])
    if causal:
        i = torch.arange(nb, device=ids.device)
        meet &= i[None, :] <= i[:, None]
        full &= i[None, :] < i[:, None]
    return block_mask_from_blocks(meet & ~full, full, _mask_mod(causal, None, 1, ids))


def block_mask_from_blocks(partial: torch.Tensor, full: torch.Tensor, mask_mod, seq_len: Optional[int] = None):
    """A FlexAttention BlockMask of FLEX_BLOCK blocks from its (B, nq, nk) bool grids: ``partial``
    blocks run ``mask_mod``, ``full`` ones run unmasked, the rest are skipped. ``seq_len``: the
    length when it is not a whole number of blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    def indexed(sel):  # (B, nq, nk) bool -> counts (B, 1, nq) and kept columns first (B, 1, nq, nk)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
        return sel.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    kv_num, kv_idx = indexed(partial)
    full_num, full_idx = indexed(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=None if seq_len is None else (seq_len, seq_len))


def flex_attention(q, k, v, scale: float, block_mask) -> torch.Tensor:
    """q (B, N, H, D), k/v (B, N, K, D) -> out (B, N, H, D), differentiable."""
    out = _flex()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale,
                  enable_gqa=k.shape[2] != q.shape[2])  # (B, H, N, D) views in, (B, H, N, D) out
    return out.transpose(1, 2)
