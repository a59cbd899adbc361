"""Exact ring attention: dense and LongNet-dilated, four variants. No Lightning here.

``create_ring_attention`` is the way to build a module by variant name; the names map to
classes in one table (registry.py), which MultiheadRingAttention reads too.
"""

from __future__ import annotations

from typing import Optional

from .base import RingAttentionBase, ring_attention_modules
from .block_sparse import BlockSparseRingAttention
from .comm import RingCommunicationError
from .config import RingAttentionConfig
from .distributed import DistributedRingAttention
from .hilbert import HilbertRingAttention
from .multihead import MultiheadRingAttention
from .reference import reference_attention
from .registry import VARIANTS, build_variant, check_fields, check_variant
from .standard import StandardRingAttention


def create_ring_attention(variant: str = "standard", config: Optional[RingAttentionConfig] = None,
                          embed_dim: Optional[int] = None, num_heads: Optional[int] = None, **fields):
    """Build a ring attention module by variant name.

    ``use_hilbert=True`` (in ``fields`` or ``config``) with ``standard`` builds ``hilbert``,
    with a warning (registry.py says why).

    Args:
        variant: one of ``standard``, ``hilbert``, ``distributed``, ``block_sparse``.
        config: a RingAttentionConfig; keyword ``fields`` override or replace it.
        embed_dim, num_heads: given together, return a MultiheadRingAttention (with
            projections; ``num_kv_heads``, ``bias`` and ``batch_first`` may be passed in ``fields``).
    Raises:
        ValueError: unknown variant (lists the valid ones). TypeError: unknown field.
    """
    check_variant(variant)
    if embed_dim is not None or num_heads is not None:
        if embed_dim is None or num_heads is None:
            raise ValueError("embed_dim and num_heads must be given together for a multihead module")
        extra = {k: fields.pop(k) for k in ("num_kv_heads", "bias", "batch_first") if k in fields}
        check_fields(fields)
        return MultiheadRingAttention(embed_dim, num_heads, variant=variant, config=config, **extra, **fields)
    return build_variant(variant, config, **fields)


__all__ = [
    "RingAttentionBase", "ring_attention_modules", "RingAttentionConfig", "RingCommunicationError", "StandardRingAttention", "HilbertRingAttention",
    "BlockSparseRingAttention",
    "DistributedRingAttention", "MultiheadRingAttention", "create_ring_attention", "reference_attention",
    "VARIANTS",
]
