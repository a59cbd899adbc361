"""Unit tier: ParallelDims, the one object for the parallel shape (ring_lightning/sequence/dims.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ring_lightning.sequence.dims import MESH_AXES, ParallelDims
from ring_lightning.sequence.lengths import LengthRules


def test_auto_is_every_device_of_a_node_and_sizes_follow():
    dims = ParallelDims.resolve(world=16, devices_per_node=8, sp="auto", ulysses=4)
    assert (dims.sp, dims.dp, dims.ulysses, dims.ring) == (8, 2, 4, 2)
    assert dims.mesh_shape == (2, 8) and MESH_AXES == ("dp", "sp")
    assert ParallelDims.resolve(1, 0).sp == 1  # no device count known: one rank per group
    assert ParallelDims.resolve(8, 8, sp=2).dp == 4
    assert [dims.sampler_kwargs(r) for r in (0, 7, 8, 15)] == [
        {"num_replicas": 2, "rank": d} for d in (0, 0, 1, 1)]
    assert (dims.sp_rank(11), dims.dp_rank(11)) == (3, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(world=2, sp=3), r"strategy\.sequence_parallel_size=3 does not divide the world size 2.*\[1, 2\]"),
    (dict(world=4, sp=4, ulysses=3), r"strategy\.ulysses_size=3 must divide strategy\.sequence_parallel_size=4.*\[1, 2, 4\]"),
    (dict(world=4, sp=0), r"sequence_parallel_size must be 'auto' or an int >= 1"),
    (dict(world=4, sp=2, layout="spiral"), r"layout='spiral' is not valid; valid values: \('auto', 'contiguous', 'zigzag'\)"),
])
def test_invalid_shapes_name_the_override_and_the_valid_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ParallelDims(**kwargs)


def test_valid_ulysses_sizes_count_the_heads():
    dims = ParallelDims(8, 8, 4)
    assert dims.valid_ulysses() == [1, 2, 4, 8] and dims.valid_ulysses(n_heads=6) == [1, 2]
    dims.check_heads(8)
    with pytest.raises(ValueError, match=r"ulysses_size=4 must divide the model's heads \(model\.n_heads=6\).*\[1, 2\]"):
        dims.check_heads(6)


def test_layout_policy_and_one_rank_splits_nothing():
    assert ParallelDims(2, 2).layout_for("zigzag") == "zigzag"
    assert ParallelDims(2, 2, layout="contiguous").layout_for("zigzag") == "contiguous"
    assert ParallelDims(2, 1, layout="zigzag").layout_for("zigzag") == "contiguous"


def test_length_rules_hold_the_ring_rules_and_the_cut_over_all_sp():
    segment = lambda ring, layout: LengthRules((48,), (8,), ring, layout)  # an attention's own rules
    # length 48, one segment of 48 at rate 8: over 4 ranks the rate does not divide the 12-token
    # piece; behind U=2 the ring runs over 2 ranks, where it divides the 24-token piece.
    assert ParallelDims(4, 4).length_error(48, segment, "contiguous") is not None
    assert ParallelDims(4, 4, 2).length_error(48, segment, "contiguous") is None
    # the cut still splits over all 4 ranks in zigzag: 8 pieces, which 44 is not a multiple of
    hybrid = ParallelDims(4, 4, 2, layout="zigzag")
    message = hybrid.length_error(44, None, override="data.seq_len")
    assert "'zigzag' layout over 4 ranks splits it into 8 equal pieces" in message
    assert "Set data.seq_len=48" in message
    assert hybrid.length_rules().multiple() == 8
    with pytest.raises(ValueError, match="sequence length 44"):
        hybrid.check_length(44)


def test_the_shape_and_the_length_rules_import_nothing_above_them():
    code = ("import sys, ring_lightning.sequence.dims, ring_lightning.sequence.sharding, "
            "ring_lightning.sequence.groups; "
            "print(sorted(m for m in sys.modules if m.startswith('ring_lightning.attention') or m == 'lightning'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_old_module_paths_are_the_moved_modules():
    import ring_lightning.lengths
    import ring_lightning.sequence_groups
    import ring_lightning.sharding
    from ring_lightning.sequence import groups, lengths, sharding

    assert (ring_lightning.lengths, ring_lightning.sharding, ring_lightning.sequence_groups) == (lengths, sharding, groups)
