"""Unit tier: the attention config's edge (config_adapter.py): other layers' fields are
accepted, warn once where they cannot act, and reach their owners as requests."""

from __future__ import annotations

import warnings

import pytest

from ring_lightning.attention import RingAttentionConfig, create_ring_attention
from ring_lightning.attention.config_adapter import (
    OTHER_LAYER_FIELDS, CheckpointingRequest, CompressionRequest, checkpointing_request, compression_request,
)
from ring_lightning.parallel.compression import _asked_by_attention


def test_the_attention_never_reads_the_other_layers_fields():
    """Every other layer's field is forwarded in the distributed variant only and warns elsewhere."""
    for name, value in (("gradient_compression_ratio", 0.5), ("compression_method", "bf16"),
                        ("use_error_feedback", False), ("use_checkpoint_accumulation", True),
                        ("checkpoint_every_n_layers", 2)):
        assert name in OTHER_LAYER_FIELDS
        with pytest.warns(UserWarning, match=f"{name}.*no effect in the 'standard' variant"):
            create_ring_attention("standard", **{name: value})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            create_ring_attention("distributed", **{name: value})


@pytest.mark.parametrize("fields, request_", [
    ({}, None),  # the default method alone asks nothing: the strategy decides
    ({"gradient_compression_ratio": 0.25}, CompressionRequest("topk", 0.25, True)),
    ({"compression_method": "powersgd", "use_error_feedback": False}, CompressionRequest("powersgd", None, False)),
    ({"compression_method": "none", "gradient_compression_ratio": 0.25}, None),
])
def test_compression_request(fields, request_):
    cfg = RingAttentionConfig(**fields)
    assert compression_request("distributed", cfg) == request_
    assert compression_request("standard", cfg) is None
    attn = create_ring_attention("distributed", config=cfg)
    want = None if request_ is None else (request_.method, 0.1 if request_.ratio is None else request_.ratio,
                                           request_.error_feedback)
    assert _asked_by_attention(attn, 0.1, True) == want


def test_checkpointing_request():
    cfg = RingAttentionConfig(use_checkpoint_accumulation=True, checkpoint_every_n_layers=3)
    assert checkpointing_request("distributed", cfg) == CheckpointingRequest(3)
    assert checkpointing_request("hilbert", cfg) is None
    assert checkpointing_request("distributed", RingAttentionConfig()) is None


def test_enums_are_defined_once():
    from ring_lightning.parallel import compression
    from ring_lightning.attention import VARIANTS, config, config_adapter, registry
    from ring_lightning.sequence.sharding import LAYOUTS as sharding_layouts

    assert compression.COMPRESSION_METHODS is config_adapter.COMPRESSION_METHODS
    assert config.VARIANTS is registry.VARIANTS is VARIANTS
    assert config.LAYOUT_CHOICES[1:] == sharding_layouts
