"""What ring attention accepts as q, k, v: checks with what to change, and the two layouts.

The ring's own layout is ``(B, T, H, D)`` (flash-attn's, the one a sequence shard is
sliced from along dim 1). ``scaled_dot_product_attention`` takes ``(B, H, T, D)``; passing
that by mistake would read heads as tokens and give wrong numbers without a word, so a
call whose shape looks like it is refused unless the caller says which layout it means
(``qkv_layout``).

Letters: B batch, T (local) sequence, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

QKV_LAYOUTS = ("bthd", "bhtd")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# More "heads" than this and more "heads" than tokens reads as (B, H, T, D) passed by mistake:
# models have at most ~128 heads, while sequences (even one rank's shard) are longer.
HEADS_FIRST_SUSPECT_MIN = 128


def _heads_first_suspect(q: torch.Tensor) -> bool:
    """Does q look like a (B, H, T, D) tensor read as (B, T, H, D)?"""
    tokens, heads = q.shape[1], q.shape[2]
    return heads > tokens and heads >= HEADS_FIRST_SUSPECT_MIN


def to_bthd(q, k, v, qkv_layout: Optional[str]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """``(q, k, v)`` as (B, T, H, D) views, and whether the caller's layout was heads-first.

    Args:
        qkv_layout: ``"bthd"`` (the ring's own), ``"bhtd"`` (SDPA's; the output comes back in it
            too), or None: ``"bthd"``, refusing shapes that look like ``"bhtd"``.
    Raises:
        ValueError: an unknown ``qkv_layout``, or a likely ``(B, H, T, D)`` under None.
    """
    if qkv_layout not in (None, *QKV_LAYOUTS):
        raise ValueError(f"qkv_layout={qkv_layout!r} is not valid; valid values: {QKV_LAYOUTS} or None")
    tensors = all(isinstance(x, torch.Tensor) and x.dim() == 4 for x in (q, k, v))
    if qkv_layout == "bhtd" and tensors:
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), True  # (B, T, H|K, D) views
    if qkv_layout is None and tensors and _heads_first_suspect(q):
        raise ValueError(
            f"q {tuple(q.shape)} / k {tuple(k.shape)} look like scaled_dot_product_attention's (batch, heads, "
            f"seq, head_dim) layout, but ring attention reads (batch, seq, heads, head_dim): {q.shape[1]} tokens "
            f"of {q.shape[2]} heads. Pass qkv_layout='bhtd' for (B, H, T, D) inputs (the output is (B, H, T, D) "
            f"too), or qkv_layout='bthd' if (B, T, H, D) is what you mean")
    return q, k, v, False


def check_qkv(q, k, v) -> None:
    """(B, T, H, D) q and (B, T, K, D) k/v of one dtype and device, H % K == 0 (ValueError/TypeError)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), got {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; supported: {SUPPORTED_DTYPES}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, T, H, D = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != D:
        raise ValueError(
            f"k/v shape {tuple(k.shape)} does not match q {tuple(q.shape)} in batch, seq or head_dim "
            f"(inputs in scaled_dot_product_attention's (B, H, T, D) layout need qkv_layout='bhtd')"
        )
    if k.shape[2] < 1 or H % k.shape[2] != 0:
        raise ValueError(
            f"query heads ({H}) must be a multiple of kv heads ({k.shape[2]}) for grouped-query attention"
        )
    if T == 0:
        raise ValueError("sequence length must be positive")
