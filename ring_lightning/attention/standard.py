"""StandardRingAttention: the exact ring, nothing added (DESIGN.md section 3)."""

from .base import RingAttentionBase


class StandardRingAttention(RingAttentionBase):
    """Exact dense / dilated ring attention; see RingAttentionBase for the call."""

    variant = "standard"
