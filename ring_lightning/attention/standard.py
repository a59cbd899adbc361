"""StandardRingAttention: the exact ring, nothing added (docs/ARCHITECTURE.md)."""

from .base import RingAttentionBase


class StandardRingAttention(RingAttentionBase):
    """Exact dense / dilated ring attention; see RingAttentionBase for the call."""

    variant = "standard"
