"""StandardRingAttention: the exact ring, nothing added (docs/ARCHITECTURE.md).

Every variant file has this shape: what the variant changes, then its module, whose
``_context_options`` hands the ring the variant's task path and settings. Here the path
is the plain one (tasks.py): one block-kernel call per task.
"""

import torch

from .base import RingAttentionBase
from .tasks import TaskPath


class StandardRingAttention(RingAttentionBase):
    """Exact dense / dilated ring attention; see RingAttentionBase for the call."""

    variant = "standard"

    def _context_options(self, q: torch.Tensor, seq_len: int, is_causal: bool) -> dict:
        return {"path": TaskPath()}
