"""Variant names -> classes: the one table, read by ``create_ring_attention`` and by
``MultiheadRingAttention`` (which builds its core by name), so neither imports the other.

``use_hilbert``: ``RingAttentionConfig.use_hilbert=True`` asked of the ``standard``
variant builds the ``hilbert`` variant (same results, tokens processed in Hilbert-curve
order) and says so in a UserWarning, so that a config written with the
``use_hilbert`` flag gets what it asks for and the module's ``variant`` tells the truth.
In ``distributed`` and ``block_sparse`` the field cannot act (they have no token-order
hook) and warns as inert (``RingAttentionConfig.warn_inert_fields``); ``hilbert`` always
uses the curve, so ``use_hilbert=False`` does not turn it off. A class instantiated
directly (``StandardRingAttention(use_hilbert=True)``) is what was asked for: the field
warns as inert there too.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

from .base import RingAttentionBase
from .block_sparse import BlockSparseRingAttention
from .config import VARIANTS, RingAttentionConfig
from .distributed import DistributedRingAttention
from .hilbert import HilbertRingAttention
from .standard import StandardRingAttention

VARIANT_CLASSES = {cls.variant: cls for cls in (
    StandardRingAttention, HilbertRingAttention, DistributedRingAttention, BlockSparseRingAttention)}
if tuple(VARIANT_CLASSES) != VARIANTS:  # config.VARIANTS is the one list of names
    raise ImportError(f"variant classes {tuple(VARIANT_CLASSES)} do not match config.VARIANTS {VARIANTS}")


def check_fields(fields: dict) -> None:
    """TypeError listing the valid fields if ``fields`` holds a name RingAttentionConfig lacks."""
    unknown = sorted(set(fields) - set(RingAttentionConfig.field_names()))
    if unknown:
        raise TypeError(f"unknown RingAttentionConfig field(s) {unknown}; valid fields: "
                        f"{RingAttentionConfig.field_names()}")


def check_variant(variant: str) -> None:
    if variant not in VARIANT_CLASSES:
        raise ValueError(f"unknown ring attention variant {variant!r}; valid variants: {sorted(VARIANT_CLASSES)}")


def build_variant(variant: str, config: Optional[RingAttentionConfig] = None, **fields) -> RingAttentionBase:
    """The ring attention module of ``variant`` (config and field overrides as for the classes)."""
    check_variant(variant)
    check_fields(fields)
    use_hilbert = fields.get("use_hilbert", getattr(config, "use_hilbert", False))
    if variant == "standard" and use_hilbert:
        warnings.warn("RingAttentionConfig.use_hilbert=True turns the 'standard' variant into 'hilbert' "
                      "(same results, tokens in Hilbert-curve order); ask for variant='hilbert' instead",
                      UserWarning, stacklevel=3)
        variant = "hilbert"
    return VARIANT_CLASSES[variant](config, **fields)


__all__ = ["VARIANTS", "VARIANT_CLASSES", "build_variant", "check_fields", "check_variant"]
