"""The ring's segment groups across ranks: a dilated call whose large tasks run in groups of
whole segments (attention/ring.py) equals the float64 reference on 2 gloo ranks, for both
layouts, with and without packed documents; the received keys' gradients (sent home) and the
local ones (added in place) both go through the grouped path."""

from __future__ import annotations

import pytest

import _segment_group_worker as worker

pytestmark = pytest.mark.distributed

FLOAT64_REL_TOL = 1e-10


def test_segment_groups_on_two_ranks_equal_the_reference(run_distributed):
    results = run_distributed(worker.grouped_against_reference, 2, timeout=300)
    for rank, res in enumerate(results):
        assert res["grouped_tasks"] > 0, f"rank {rank}: no task ran in several groups"
        for key, err in res["errors"].items():
            assert err < FLOAT64_REL_TOL, f"rank {rank} {key}: relative error {err:.2e}"
