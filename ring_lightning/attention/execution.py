"""Execution options every variant honours: mixed precision and gradient validation.

They change how blocks are computed and checked, not which tokens attend, so they are
RingContext fields asked for by the config (``enable_mixed_precision``,
``attention_dtype``, ``validate_gradients``) whatever the variant; the ``distributed``
variant is the preset that also blocks every communication wait with ``comm_timeout_s``.
A call that needs one of them takes the ring (route.py: one fused call cannot honour them).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def execution_options(cfg, q_dtype: torch.dtype, module_name: str) -> dict:
    """RingContext fields of the config's execution options for inputs of ``q_dtype``."""
    opts = {}
    if cfg.enable_mixed_precision and q_dtype in (torch.float32, torch.float64):
        opts["compute_dtype"] = cfg.attention_dtype or torch.bfloat16
    if cfg.validate_gradients:
        opts["grad_check"] = GradientCheck(module_name)
    return opts


class GradientCheck:
    """Raise on every rank of ``group`` (the ring's, None on one device) if any has a non-finite entry."""

    def __init__(self, module_name: str) -> None:
        self.module_name = module_name

    def __call__(self, name: str, grad: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> None:
        finite = torch.isfinite(grad).all().to(torch.int32).reshape(1)
        if group is not None:
            # every rank of the sequence group raises together: a lone raise would leave the
            # others waiting in the next collective
            dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=group)
        if not bool(finite.item()):
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            bad = int((~torch.isfinite(grad)).sum())
            raise FloatingPointError(
                f"rank {rank}: {self.module_name} produced a non-finite gradient for {name} "
                f"({bad} entries on this rank; at least one rank of the group has some). Lower the learning rate, "
                f"enable gradient clipping, or check the inputs of this module (validate_gradients=True raised this)."
            )
