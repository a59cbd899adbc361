"""Exact ring attention: dense and LongNet-dilated, four variants. No Lightning here.

``create_ring_attention`` is the only place variant names map to classes.
"""

from __future__ import annotations

from typing import Optional

from .base import RingAttentionBase
from .block_sparse import BlockSparseRingAttention
from .comm import RingCommunicationError
from .config import VARIANTS, RingAttentionConfig
from .distributed import DistributedRingAttention
from .hilbert import HilbertRingAttention
from .multihead import MultiheadRingAttention
from .reference import reference_attention
from .standard import StandardRingAttention

_CLASSES = {
    "standard": StandardRingAttention,
    "hilbert": HilbertRingAttention,
    "distributed": DistributedRingAttention,
    "block_sparse": BlockSparseRingAttention,
}


def create_ring_attention(variant: str = "standard", config: Optional[RingAttentionConfig] = None,
                          embed_dim: Optional[int] = None, num_heads: Optional[int] = None, **fields):
    """Build a ring attention module by variant name.

    Args:
        variant: one of ``standard``, ``hilbert``, ``distributed``, ``block_sparse``.
        config: a RingAttentionConfig; keyword ``fields`` override or replace it.
        embed_dim, num_heads: given together, return a MultiheadRingAttention (with
            projections; ``num_kv_heads`` and ``bias`` may be passed in ``fields``).
    Raises:
        ValueError: unknown variant (lists the valid ones). TypeError: unknown field.
    """
    if variant not in _CLASSES:
        raise ValueError(f"unknown ring attention variant {variant!r}; valid variants: {sorted(_CLASSES)}")
    if embed_dim is not None or num_heads is not None:
        if embed_dim is None or num_heads is None:
            raise ValueError("embed_dim and num_heads must be given together for a multihead module")
        extra = {k: fields.pop(k) for k in ("num_kv_heads", "bias") if k in fields}
        _check_fields(fields)
        return MultiheadRingAttention(embed_dim, num_heads, variant=variant, config=config, **extra, **fields)
    _check_fields(fields)
    return _CLASSES[variant](config, **fields)


def _check_fields(fields: dict) -> None:
    unknown = sorted(set(fields) - set(RingAttentionConfig.field_names()))
    if unknown:
        raise TypeError(f"unknown RingAttentionConfig field(s) {unknown}; valid fields: "
                        f"{RingAttentionConfig.field_names()}")


__all__ = [
    "RingAttentionBase", "RingAttentionConfig", "RingCommunicationError", "StandardRingAttention", "HilbertRingAttention",
    "BlockSparseRingAttention",
    "DistributedRingAttention", "MultiheadRingAttention", "create_ring_attention", "reference_attention",
    "VARIANTS",
]
