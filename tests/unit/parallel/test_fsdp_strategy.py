"""RingFSDPStrategy's arguments and Hydra option, without processes (training: tests/distributed/test_fsdp.py)."""

from __future__ import annotations

import pytest
from lightning.pytorch.strategies import StrategyRegistry

from ring_lightning.parallel.fsdp import RingFSDPStrategy


def test_registered_as_ring_fsdp():
    assert StrategyRegistry["ring_fsdp"]["strategy"] is RingFSDPStrategy


@pytest.mark.parametrize("method", ["topk", "randomk", "powersgd", "bf16"])
def test_gradient_compression_is_refused_naming_the_field(method):
    with pytest.raises(ValueError, match=r"strategy\.compression='" + method + "'.*FSDP2 has none"):
        RingFSDPStrategy(compression=method)


def test_compression_arguments_a_config_merges_in_are_accepted_with_none():
    strategy = RingFSDPStrategy(compression="none", compression_ratio=0.01, error_feedback=True)
    assert strategy.compression == "none"
    with pytest.raises(TypeError, match="unexpected arguments"):
        RingFSDPStrategy(find_unused_parameters=True)


@pytest.mark.parametrize("kwargs, field", [
    (dict(sequence_parallel_size=0), "sequence_parallel_size"),
    (dict(loss_reduction="avg"), "loss_reduction"),
    (dict(shift_labels="yes"), "shift_labels"),
    (dict(layout="spiral"), "layout"),
    (dict(start_method="thread"), "start_method"),
])
def test_bad_arguments_name_their_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        RingFSDPStrategy(**kwargs)
