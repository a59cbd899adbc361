"""The FlexAttention block masks of the one-GPU path, checked on CPU (flex.py).

The packed-document mask is built from block summaries; it must equal what
``create_block_mask`` finds by evaluating every pair (kept blocks, full blocks, and the
dense mask), and attention under it must equal the brute-force reference (forward: CPU
FlexAttention has no backward; the GPU tier checks gradients)."""

import pytest
import torch

from ring_lightning.attention import reference_attention
from ring_lightning.attention.flex import _mask_mod, packed_document_mask

flex = pytest.importorskip("torch.nn.attention.flex_attention")


def packed_rows(N, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for max_len in (300, 2, N + 1):  # long documents, many one/two-token ones, one document
        lengths = []
        while sum(lengths) < N:
            lengths.append(int(torch.randint(1, max_len, (1,), generator=g)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:N] * 3)
    return torch.stack(rows)  # ids that skip values, too


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_packed_document_mask_equals_create_block_mask(causal, seed):
    N = 1024
    ids = packed_rows(N, seed)
    fast = packed_document_mask(ids, causal)
    slow = flex.create_block_mask(_mask_mod(causal, None, 1, ids), ids.shape[0], None, N, N, device="cpu")
    assert torch.equal(fast.kv_num_blocks, slow.kv_num_blocks)
    assert torch.equal(fast.full_kv_num_blocks, slow.full_kv_num_blocks)
    assert torch.equal(fast.to_dense(), slow.to_dense())


@pytest.mark.parametrize("causal", [True, False])
def test_attention_under_the_packed_mask_equals_reference(causal):
    N, H, D = 256, 2, 16
    ids = packed_rows(N, 2)
    q, k, v = (torch.randn(3, H, N, D, dtype=torch.float64) for _ in range(3))
    out = flex.flex_attention(q, k, v, block_mask=packed_document_mask(ids, causal))
    ref, _ = reference_attention(*(x.transpose(1, 2) for x in (q, k, v)), causal, document_ids=ids)
    torch.testing.assert_close(out.transpose(1, 2), ref, rtol=1e-10, atol=1e-10)
