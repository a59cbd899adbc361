"""A trainer's sequence length against its model's attention under its strategy's parallel shape.

The data module asks this at setup, before the first batch (plain Lightning users have no
pre-flight). The rules are the attention's (``RingAttentionConfig.length_rules``) placed on the
shape by :meth:`ParallelDims.length_rules`; this file only finds the modules and the shape.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from ring_lightning.attention import ring_attention_modules
from ring_lightning.sequence.dims import ParallelDims


def strategy_dims(strategy: Any) -> ParallelDims:
    """The strategy's :class:`ParallelDims`; a strategy without one splits nothing (sp=1)."""
    dims = getattr(strategy, "parallel_dims", None)
    if isinstance(dims, ParallelDims):
        return dims
    sp = getattr(strategy, "sequence_parallel_size", 1)
    world = getattr(strategy, "world_size", sp)
    world = world if isinstance(world, int) and world % sp == 0 else sp
    return ParallelDims(world, sp, getattr(strategy, "ulysses_size", 1), getattr(strategy, "layout", "auto"))


def check_trainer_length(seq_len: int, trainer: Any, override: str = "seq_len") -> None:
    """``seq_len`` against every ring attention module of ``trainer``'s LightningModule.

    Raises:
        ValueError: for the first module that refuses it, naming ``override`` and a length that works.
    """
    module = getattr(trainer, "lightning_module", None)
    if module is None:
        return
    dims = strategy_dims(getattr(trainer, "strategy", None))
    for attn in ring_attention_modules(module):
        rules = partial(attn.config.length_rules, variant=attn.variant)
        dims.check_length(seq_len, rules, attn.config.layout, override)
