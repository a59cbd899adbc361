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

import warnings

import torch
import torch.distributed as dist

from .base import RingAttentionBase


class DistributedRingAttention(RingAttentionBase):
    """Standard ring + mixed precision, gradient validation and timeouts on every wait."""

    variant = "distributed"

    def __init__(self, config=None, **fields) -> None:
        super().__init__(config, **fields)
        if self.config.attention_dtype is not None and not self.config.enable_mixed_precision:
            warnings.warn("RingAttentionConfig.attention_dtype has no effect without "
                          "enable_mixed_precision=True", UserWarning, stacklevel=2)

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

    def _check_gradient(self, name: str, grad: torch.Tensor, group=None) -> None:
        """Raise on every rank of ``group`` (the ring's, None on one device) if any has a non-finite entry."""
        finite = torch.isfinite(grad).all().to(torch.int32).reshape(1)
        if group is not None:
            # every rank of the sequence group raises together: a lone raise would leave the
            # others waiting in the next collective
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
        if not bool(finite.item()):
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            bad = int((~torch.isfinite(grad)).sum())
            raise FloatingPointError(
                f"rank {rank}: {type(self).__name__} produced a non-finite gradient for {name} "
                f"({bad} entries on this rank; at least one rank of the group has some). Lower the learning rate, enable gradient clipping, or check the "
                f"inputs of this module (validate_gradients=True raised this)."
            )
