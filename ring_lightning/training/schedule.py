"""The learning-rate schedule of LongDocumentLM, and what a resume does to it.

``WarmupCosine``: linear warm-up, then cosine decay to ``min_ratio * lr`` at ``max_steps``.
On resume the step count comes from the checkpoint but the schedule from THIS run's config
(``keep_configured_schedule``), so raising ``trainer.max_steps`` stretches the cosine to
the new end instead of holding the old end's learning rate, and a changed ``module.lr``
applies.
"""

from __future__ import annotations

import math
from typing import Any, Dict


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
