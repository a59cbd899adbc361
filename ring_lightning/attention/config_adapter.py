"""The attention config's edge: fields of other layers it accepts, and what each owner gets.

``RingAttentionConfig`` accepts five fields the attention itself never reads: gradient
compression (the strategy's DDP communication hook, compression.py) and activation
checkpointing (the model, which alone can recompute the layers around the attention).
They act in the ``distributed`` variant only (elsewhere they warn once as inert:
``RingAttentionConfig.warn_inert_fields``), and this file is the only reader: each owner
asks it for its request, never the config's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

#: the gradient compression methods of the strategy's DDP hook (compression.py owns the hooks)
COMPRESSION_METHODS = ("none", "topk", "randomk", "powersgd", "bf16")
#: the variant in which the other layers' fields act
ACTING_VARIANT = "distributed"
#: field -> its owner
OTHER_LAYER_FIELDS = {
    "gradient_compression_ratio": "the strategy's DDP communication hook (compression.py)",
    "compression_method": "the strategy's DDP communication hook (compression.py)",
    "use_error_feedback": "the strategy's DDP communication hook (compression.py)",
    "use_checkpoint_accumulation": "the model's activation checkpointing",
    "checkpoint_every_n_layers": "the model's activation checkpointing",
}


@dataclass(frozen=True)
class CompressionRequest:
    """What an attention config asks of the DDP hook; ``ratio`` None: the strategy's."""

    method: str
    ratio: Optional[float]
    error_feedback: bool


@dataclass(frozen=True)
class CheckpointingRequest:
    """Selective activation checkpointing of every n-th layer, asked by an attention config."""

    every_n_layers: int


def _default(config, name: str):
    return {f.name: f.default for f in fields(config)}[name]


def compression_request(variant: str, config) -> Optional[CompressionRequest]:
    """The gradient compression ``config`` asks for in ``variant``, or None.

    It asks when ``gradient_compression_ratio`` is set or ``compression_method`` differs from
    its default, in the acting variant only, and never for method ``none``."""
    if variant != ACTING_VARIANT or config is None:
        return None
    ratio, method = config.gradient_compression_ratio, config.compression_method
    if method == "none" or (ratio is None and method == _default(config, "compression_method")):
        return None
    return CompressionRequest(method, None if ratio is None else float(ratio), bool(config.use_error_feedback))


def checkpointing_request(variant: str, config) -> Optional[CheckpointingRequest]:
    """The activation checkpointing ``config`` asks of the model in ``variant``, or None."""
    if variant != ACTING_VARIANT or config is None or not config.use_checkpoint_accumulation:
        return None
    return CheckpointingRequest(int(config.checkpoint_every_n_layers))
