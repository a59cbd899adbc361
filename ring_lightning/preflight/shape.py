"""The parallel shape and the sequence length, from the composed config.

``parallel_dims`` builds the :class:`ParallelDims` the strategy will build (ring_lightning/sequence/dims.py:
``sp="auto"`` resolved and every field validated there); ``check_sequence_length`` puts the
attention's length rules on that shape.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ring_lightning.preflight.errors import ConfigError, _with_group
from ring_lightning.sequence.dims import ParallelDims, check_sp_request

def parallel_dims(cfg: DictConfig, per_node: int) -> ParallelDims:
    """The parallel shape the strategy will build (ring_lightning/sequence/dims.py), from the
    composed config: ``sp="auto"`` resolved there, every field validated there; a strategy that
    splits nothing is sp=1. ``model.n_heads`` is checked against ``strategy.ulysses_size`` too."""
    strategy = cfg.get("strategy") or {}
    world = per_node * int(cfg.trainer.get("num_nodes", 1) or 1)
    if not str(strategy.get("_target_", "")).endswith(("RingStrategy", "RingFSDPStrategy")):
        return ParallelDims(world, 1)
    sp, layout = strategy.get("sequence_parallel_size", "auto"), str(strategy.get("layout", "auto"))
    try:
        check_sp_request(sp)
    except ValueError:
        return ParallelDims(world, 1, layout=layout)  # the strategy names a malformed value itself
    try:
        dims = ParallelDims.resolve(world, per_node, sp, strategy.get("ulysses_size", 1), layout)
        heads = (cfg.get("model") or {}).get("n_heads")
        if isinstance(heads, int):
            dims.check_heads(heads)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return dims

def attention_rules(cfg: DictConfig):
    """(the attention's length rules as a function of (ring ranks, layout), its layout), from
    ``module.attention``; None for a module without one (a user's own module)."""
    from ring_lightning.attention.config import RingAttentionConfig

    node = cfg.module.get("attention")  # None for a module of the user's own (examples/conf/module/own_lm.yaml)
    attention = OmegaConf.to_container(node, resolve=True) if node is not None else {}
    if not isinstance(attention, dict):
        return None
    variant = attention.pop("variant", "standard")
    try:
        config = RingAttentionConfig(**attention)
    except (TypeError, ValueError) as exc:
        raise ConfigError(_with_group(str(exc), [("variant", cfg.get("variant"))])) from exc
    return partial(config.length_rules, variant=variant), config.layout

def check_sequence_length(cfg: DictConfig, per_node: int, dims: Optional[ParallelDims] = None) -> None:
    """``data.seq_len`` against every rule of the attention under the parallel shape, as one message."""
    seq_len = cfg.data.get("seq_len")
    attention = attention_rules(cfg)
    if not isinstance(seq_len, int) or attention is None:
        return  # the data module / LM report a malformed value themselves
    dims = dims or parallel_dims(cfg, per_node)
    message = dims.length_error(seq_len, *attention, override="data.seq_len")
    if message is None:
        return
    rules = dims.length_rules(*attention)
    if rules.block_size and seq_len % rules.block_size:
        message += f"; or variant.block_size={math.gcd(seq_len, rules.block_size)}"
    raise ConfigError(message)
