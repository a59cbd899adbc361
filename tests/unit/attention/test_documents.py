"""Packed documents on one process: the model with document_ids equals the model run on
each document alone; positions that restart per document; input checks; the LM's switch."""

import pytest
import torch

from ring_lightning.attention import create_ring_attention
from ring_lightning.attention.documents import Documents, document_position_ids
from ring_lightning.models.model import LongDocTransformer, ModelConfig
from ring_lightning.training.module import LongDocumentLM

LENGTHS = [5, 1, 10, 16]  # a one-token document, and documents of other lengths


def packed(B=1):
    ids = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    return ids.unsqueeze(0).expand(B, -1)


def model64():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", n_layers=2)
    model = LongDocTransformer(cfg, lambda i: create_ring_attention("standard", compute_block_size=4)).double()
    return model


@pytest.mark.parametrize("restart", [True, False])
def test_model_with_documents_equals_each_document_alone(restart):
    """Loss and every parameter gradient. RoPE is relative, so global positions give the same
    numbers as restarted ones (to rounding); restarted positions make it exact by construction."""
    model = model64()
    N = sum(LENGTHS)
    tokens = torch.randint(259, (1, N), generator=torch.Generator().manual_seed(3))
    doc_ids = packed()
    pos = document_position_ids(doc_ids) if restart else None
    logits = model(tokens, pos, doc_ids)
    loss = logits.pow(2).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))

    alone, start = [], 0
    for n in LENGTHS:
        alone.append(model(tokens[:, start:start + n], None if restart else torch.arange(start, start + n)))
        start += n
    logits_alone = torch.cat(alone, dim=1)
    loss_alone = logits_alone.pow(2).mean()
    grads_alone = torch.autograd.grad(loss_alone, list(model.parameters()))
    # RMSNorm normalises in float32 even for a float64 model: float32-level tolerances
    torch.testing.assert_close(logits, logits_alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, loss_alone, rtol=1e-6, atol=0)
    for g, ga in zip(grads, grads_alone):
        torch.testing.assert_close(g, ga, rtol=1e-4, atol=1e-7)
    # and the mask matters: without it the same packed row gives other numbers
    assert not torch.allclose(model(tokens, pos), logits, atol=1e-3)


def test_document_positions_restart_at_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 2, 2], [4, 4, 1, 1, 4, 1]])  # packed row; ids in any order
    assert document_position_ids(ids).tolist() == [[0, 1, 2, 0, 0, 1], [0, 1, 0, 1, 2, 2]]


def test_packed_detection_and_task_skipping():
    assert Documents(packed()).packed
    assert not Documents(torch.tensor([[0, 1, 0]])).packed


def test_bad_document_ids_are_explained():
    attn = create_ring_attention("standard")
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"document_ids must have shape \(batch, seq\) = \(1, 8\)"):
        attn(q, q, q, document_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        attn(q, q, q, document_ids=torch.zeros(1, 8))


def test_row_without_key_outputs_zero():
    """Non-causal, a dilated pattern whose selected keys miss the query's one-token document."""
    attn = create_ring_attention("standard", segment_lengths=[4], dilation_rates=[2])
    q = torch.randn(1, 4, 2, 4, dtype=torch.float64)
    ids = torch.tensor([[0, 1, 1, 1]])
    out = attn(q, q, q, document_ids=ids)
    assert torch.isfinite(out).all()


def test_lm_passes_document_ids_unless_switched_off():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, q, k, v, is_causal, already_split, document_ids=None):
            seen.append(document_ids)
            return q

    class LM(LongDocumentLM):
        def build_attention(self, layer_idx):
            return Spy()

    batch = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "labels": torch.zeros(1, 8, dtype=torch.long),
             "document_ids": torch.tensor([[0, 0, 1, 1, 1, 2, 2, 2]])}
    for switch, expect in ((True, True), (False, False)):
        seen.clear()
        lm = LM(model={"preset": "tiny"}, document_mask=switch)
        b = lm.prepare_batch(batch)
        lm(b["input_ids"], b["position_ids"], lm.document_ids(b))
        assert all((d is not None) == expect for d in seen) and len(seen) == 2
    lm = LM(model={"preset": "tiny"}, restart_positions_per_document=True)
    assert lm.on_before_batch_transfer(dict(batch), 0)["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0, 1, 2]]


def test_a_core_without_document_ids_is_told_how_to_fix_it():
    class PlainCore(torch.nn.Module):
        def forward(self, q, k, v, is_causal, already_split):
            return q

    model = LongDocTransformer(ModelConfig.preset("tiny"), lambda i: PlainCore())
    x = torch.zeros(1, 8, dtype=torch.long)
    model(x)  # no documents: the core is called as before
    with pytest.raises(TypeError, match="module.document_mask=false"):
        model(x, None, torch.zeros(1, 8, dtype=torch.long))


def test_document_ids_work_under_inference_mode():
    attn = create_ring_attention("standard")
    with torch.inference_mode():
        q = torch.randn(1, 8, 2, 4)
        assert attn(q, q, q, is_causal=True, document_ids=packed()[:, :8].clone()).shape == q.shape
