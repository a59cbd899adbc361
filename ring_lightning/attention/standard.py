"""StandardRingAttention: the exact ring, nothing added (docs/ARCHITECTURE.md).

A variant is a named preset: what it declares (masks, the task path and its options, timed
waits) over what every variant shares (base.py: the call's description and route; the
config's pattern and execution options). The standard one declares nothing: one
block-kernel call per task (tasks.TaskPath).
"""

from .base import RingAttentionBase


class StandardRingAttention(RingAttentionBase):
    """Exact dense / dilated ring attention; see RingAttentionBase for the call."""

    variant = "standard"
