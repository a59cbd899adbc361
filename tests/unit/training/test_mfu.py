"""perf/tflops_per_gpu and perf/mfu count the attention the run really does.

A tiny LongDocumentLM trains a few steps on CPU (sp=1) under packed documents, a block-sparse
mask and a token grid's window; the model FLOPs the module accumulates for its throughput
metrics (``_flops_seen``, what ``perf/tflops_per_gpu`` divides by the elapsed time) must equal
``6 * params * tokens`` plus every layer's attention FLOPs of the pairs a brute force counts
on the oracle's token masks (``reference.py``), batch by batch.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from ring_lightning.attention.masks import block_mask_for
from pairs_oracle import brute_pairs
from ring_lightning.models.flops import flops_from_pairs
from ring_lightning.training.module import LongDocumentLM

SEQ, BATCH, STEPS = 64, 2, 3


class Recording(LongDocumentLM):
    """Keeps the whole batches it trained on (sp=1: the batch is not sharded)."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.seen = getattr(self, "seen", []) + [batch["document_ids"].clone()]
        super().on_train_batch_end(outputs, batch, batch_idx)


def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        ids = torch.randint(0, SEQ, (BATCH, SEQ), generator=g)
        docs = torch.randint(0, 4, (BATCH, SEQ), generator=g).sort(dim=1).values  # 1-4 documents a row
        out.append({"input_ids": ids, "labels": ids, "document_ids": docs})
    return DataLoader(out, batch_size=None)


@pytest.mark.parametrize("attention, pattern", [
    ({"variant": "standard", "segment_lengths": [16, 64], "dilation_rates": [1, 2]},
     dict(segments=[16, 64], rates=[1, 2])),
    ({"variant": "block_sparse", "block_size": 16, "sparsity_ratio": 0.5, "sparse_pattern": "random"},
     dict(block_mask=block_mask_for(SEQ, 16, "random", 0.5, 0), block_size=16)),
    # a grid is one image per row: no documents (the attention refuses both)
    ({"variant": "hilbert", "grid_shape": [8, 8], "grid_window": 2}, dict(grid=[8, 8], window=[2, 2])),
], ids=["documents_dilated", "block_sparse_documents", "grid_window"])
def test_logged_flops_count_the_allowed_pairs_of_every_mask(attention, pattern):
    grid = "grid_shape" in attention
    module = Recording(model={"preset": "tiny"}, attention=attention, warmup_steps=1, document_mask=not grid)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, max_steps=STEPS,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=batches())
    c = module.model.config
    matmuls = 6 * module.model.num_params(exclude_embedding=True) * BATCH * SEQ
    expected = sum(matmuls + c.n_layers * flops_from_pairs(
        brute_pairs(ids.shape[1], c.n_heads, document_ids=torch.zeros_like(ids) if grid else ids, **pattern), c.head_dim, recompute=False)
        for ids in module.seen)
    assert len(module.seen) == STEPS
    assert module._flops_seen == pytest.approx(expected, rel=1e-12)
    # the documents matter: the same batches counted densely are more work
    dense = sum(matmuls + c.n_layers * flops_from_pairs(BATCH * c.n_heads * SEQ**2 / 2, c.head_dim, recompute=False)
                for _ in module.seen)
    assert module._dense_flops_seen == pytest.approx(dense, rel=1e-12) and expected < dense
