"""The reference transformer split over 2 and 4 ranks equals one device (loss and grads)."""

from __future__ import annotations

import pytest
import torch

import conftest
import _model_worker as worker

pytestmark = pytest.mark.distributed
FLOAT32_TOL = 1e-5


@pytest.mark.parametrize("world", [2, 4])
def test_transformer_under_zigzag_sequence_parallel_matches_one_device(world):
    ref_loss, ref_grads = worker.loss_and_grads(0, 1)
    for loss, grads in conftest.run_distributed(worker.loss_and_grads, world, timeout=180):
        assert loss == pytest.approx(ref_loss, rel=FLOAT32_TOL)
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=FLOAT32_TOL, rtol=1e-4, msg=name)
