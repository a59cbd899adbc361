"""DistributedRingAttention: the standard ring preset for production runs.

* communication waits block the host with ``comm_timeout_s`` on every backend, so a peer
  that stops taking part raises ``RingCommunicationError`` naming it (never a hang);
* mixed precision (``enable_mixed_precision``, ``attention_dtype``) and
  ``validate_gradients`` are execution options every variant honours (execution.py);
* gradient compression and activation checkpointing fields are accepted by the config and
  read by their owners (config_adapter.py); the attention itself does not compress anything.
"""

from __future__ import annotations

from .base import RingAttentionBase


class DistributedRingAttention(RingAttentionBase):
    """Standard ring with timeouts on every wait (execution options as in every variant)."""

    variant = "distributed"
    timed_waits = True
