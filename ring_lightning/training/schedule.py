"""The learning-rate schedule of LongDocumentLM, and what a resume does to it.

``WarmupCosine``: linear warm-up, then cosine decay to ``min_ratio * lr`` at ``max_steps``.
On resume the step count comes from the checkpoint but the schedule from THIS run's config
(``keep_configured_schedule``), so raising ``trainer.max_steps`` stretches the cosine to
the new end instead of holding the old end's learning rate, and a changed ``module.lr``
applies.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple


class WarmupCosine:
    """LR multiplier: linear warm-up over ``warmup_steps``, cosine to ``min_ratio`` at ``max_steps``."""

    def __init__(self, warmup_steps: int, max_steps: float, min_ratio: float):
        self.warmup_steps, self.max_steps, self.min_ratio = warmup_steps, max_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if not math.isfinite(self.max_steps):
            return 1.0  # no known end: hold the peak
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def keep_configured_schedule(checkpoint: Dict[str, Any], lr: float) -> None:
    """Make a Lightning checkpoint resume THIS run's schedule (in place): the step count is
    kept; the schedule's parameters and the peak ``lr`` come from the config (the saved
    learning rate of each group is rescaled by ``lr / saved peak``, so a lower
    ``module.lr`` takes effect from the first resumed step)."""
    for state in checkpoint.get("lr_schedulers", []):
        if "lr_lambdas" in state:  # None: LambdaLR keeps the schedule it was built with
            state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
        if "base_lrs" in state:
            state["base_lrs"] = [lr] * len(state["base_lrs"])
    for opt in checkpoint.get("optimizer_states", []):
        for group in opt.get("param_groups", []):
            peak = group.get("initial_lr")
            if peak:
                group["lr"] = group["lr"] * lr / peak
                group["initial_lr"] = lr


def optimizer_settings(lr: float, weight_decay: float, betas: Sequence[float], warmup_steps: int,
                       max_steps: Optional[int], min_lr_ratio: float) -> Tuple[float, float, tuple, int, Optional[int], float]:
    """AdamW's and the schedule's arguments of a module, checked once for every LightningModule
    of the package (LongDocumentLM, HFCausalLM): ``(lr, weight_decay, betas, warmup_steps,
    max_steps, min_lr_ratio)`` as plain numbers.

    Raises:
        ValueError: an argument outside its valid values, naming it.
    """
    betas = tuple(float(b) for b in betas)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be None or >= 1, got {max_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    return float(lr), float(weight_decay), betas, int(warmup_steps), max_steps, float(min_lr_ratio)
