"""DistributedRingAttention: the standard ring plus the production features.

* mixed precision: blocks computed in ``attention_dtype`` (bfloat16 by default), merged and
  accumulated in float32 (merge.py), dK/dV returned in float32;
* ``validate_gradients``: a non-finite input gradient raises, naming the rank and module;
* communication waits block the host with ``comm_timeout_s`` on every backend, so a peer
  that stops taking part raises ``RingCommunicationError`` naming it (never a hang);
* gradient compression and activation checkpointing are read from this config by the
  strategy's DDP hook and by the model (``use_checkpoint_accumulation``,
  ``checkpoint_every_n_layers``); the attention itself does not compress anything.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .base import RingAttentionBase


class DistributedRingAttention(RingAttentionBase):
    """Standard ring + mixed precision, gradient validation and timeouts on every wait."""

    variant = "distributed"

    def _comm_blocking(self):
        return True

    def _context_options(self, q: torch.Tensor, seq_len: int, is_causal: bool) -> dict:
        cfg = self.config
        opts = {}
        if cfg.enable_mixed_precision and q.dtype in (torch.float32, torch.float64):
            opts["compute_dtype"] = cfg.attention_dtype or torch.bfloat16
        if cfg.validate_gradients:
            opts["grad_check"] = self._check_gradient
        return opts

    def _check_gradient(self, name: str, grad: torch.Tensor) -> None:
        if not bool(torch.isfinite(grad).all()):
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            bad = int((~torch.isfinite(grad)).sum())
            raise FloatingPointError(
                f"rank {rank}: {type(self).__name__} produced a non-finite gradient for {name} "
                f"({bad} entries). Lower the learning rate, enable gradient clipping, or check the "
                f"inputs of this module (validate_gradients=True raised this)."
            )
