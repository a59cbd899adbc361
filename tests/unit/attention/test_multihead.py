"""Torch-shaped inputs: the (B, H, T, D) mistake is refused (qkv_layout says which layout is
meant), and MultiheadRingAttention behaves like nn.MultiheadAttention (batch_first,
need_weights, (out, weights)), checked against torch's own module with the same weights."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from ring_lightning.attention import MultiheadRingAttention, create_ring_attention

TOL = dict(atol=1e-5, rtol=1e-5)  # float32, same math in another order


def test_heads_first_inputs_are_refused_with_the_argument_to_pass():
    attn = create_ring_attention("standard")
    q, k, v = torch.randn(3, 1, 4, 256, 8).unbind(0)  # SDPA's (B, H, T, D): 4 heads, 256 tokens
    with pytest.raises(ValueError, match=r"look like scaled_dot_product_attention's .*qkv_layout='bhtd'"):
        attn(q, k, v, is_causal=True)
    assert not dist.is_initialized()  # refused at the call, before any communication
    out = attn(q, k, v, is_causal=True, qkv_layout="bhtd")  # (B, H, T, D) back
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, **TOL)
    out, lse = attn(q, k, v, is_causal=True, qkv_layout="bhtd", return_lse=True)
    assert lse.shape == (1, 4, 256)
    # saying (B, T, H, D) is intended: 4 tokens of 256 heads run as asked
    assert attn(q, k, v, qkv_layout="bthd").shape == q.shape
    with pytest.raises(ValueError, match="qkv_layout='bhtd'"):  # GQA in SDPA's layout: seq lengths differ
        attn(q, k[:, :2], v[:, :2])


def _torch_twin(mha: MultiheadRingAttention, batch_first: bool) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, batch_first=batch_first)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
        ref.out_proj.load_state_dict(mha.out_proj.state_dict())
    return ref


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_matches_torch_multihead_attention_unpacked_as_torch_users_do(batch_first):
    torch.manual_seed(0)
    mha = MultiheadRingAttention(16, 4, batch_first=batch_first)
    ref = _torch_twin(mha, batch_first)
    x = torch.randn(2, 6, 16) if batch_first else torch.randn(6, 2, 16)  # batch 2, 6 tokens
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1)
    out, weights = mha(x, x, x, is_causal=True)
    ref_out, ref_weights = ref(x, x, x, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(weights, ref_weights, **TOL)  # (B, T, S), averaged over heads
    out2, none = mha(x, x, x, need_weights=False, is_causal=True)
    assert none is None and torch.equal(out2, out)
    per_head = mha(x, x, x, average_attn_weights=False)[1]
    assert per_head.shape == (2, 4, 6, 6)


def test_multihead_says_when_weights_do_not_exist_and_what_to_pass():
    mha = MultiheadRingAttention(16, 4, batch_first=True, segment_lengths=[4, 8], dilation_rates=[1, 2])
    x = torch.randn(2, 8, 16)
    with pytest.raises(ValueError, match=r"need_weights=True.*split over ranks.*pass need_weights=False"):
        MultiheadRingAttention(16, 4)(x, x, x, already_split=True)
    with pytest.raises(ValueError, match="is_causal=True"):
        mha(x, x, x, need_weights=False, attn_mask=torch.zeros(8, 8))
    with pytest.raises(ValueError, match=r"\(seq, batch, embed_dim\) \(batch_first=False\)"):
        MultiheadRingAttention(16, 4)(x[0], need_weights=False)
    out, weights = mha(x, need_weights=False)
    assert out.shape == x.shape and weights is None


@pytest.mark.parametrize("variant", ["hilbert", "block_sparse", "distributed"])
def test_every_variant_runs_under_multihead_and_qkv_layout(variant):
    """Variants that refine the core (hilbert's grid and document checks) take the same
    arguments as the base: qkv_layout reaches them through MultiheadRingAttention."""
    torch.manual_seed(0)
    fields = {"block_size": 4} if variant == "block_sparse" else {}
    mha = MultiheadRingAttention(16, 4, batch_first=True, variant=variant, **fields)
    x = torch.randn(2, 8, 16)
    out, _ = mha(x, x, x, need_weights=False, is_causal=True)
    assert out.shape == x.shape and torch.isfinite(out).all()
    q = torch.randn(1, 2, 8, 4)  # (B, H, T, D)
    assert create_ring_attention(variant, **fields)(q, q, q, qkv_layout="bhtd").shape == q.shape


@pytest.mark.parametrize("variant, fields, documents", [
    ("standard", dict(segment_lengths=[16], dilation_rates=[1]), False),  # one segment over the sequence: dense
    ("standard", dict(segment_lengths=[4, 16], dilation_rates=[1, 2]), False),  # LongNet: two merged patterns
    ("standard", dict(segment_lengths=[8, 16], dilation_rates=[2, 4]), True),
    ("block_sparse", dict(block_size=4, sparsity_ratio=0.5, sparse_pattern="random"), False),
    ("hilbert", dict(grid_shape=[4, 4], grid_window=1), False),
])
@pytest.mark.parametrize("causal", [False, True])
def test_weights_on_one_device_are_what_the_output_is_made_of(variant, fields, documents, causal):
    """Wherever one device holds the sequence, weights exist for every pattern and mask: the
    output is exactly weights @ v (then out_proj), per head; masked keys get weight 0."""
    torch.manual_seed(0)
    mha = MultiheadRingAttention(16, 4, batch_first=True, variant=variant, **fields).double()
    x = torch.randn(2, 16, 16, dtype=torch.float64)
    ids = torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7]) if documents else None
    out, weights = mha(x, x, x, is_causal=causal, document_ids=ids, average_attn_weights=False)
    v = mha.v_proj(x).view(2, 16, 4, 4)  # (B, S, H, D)
    rebuilt = mha.out_proj(torch.einsum("bhts,bshd->bthd", weights, v).reshape(2, 16, 16))
    torch.testing.assert_close(out, rebuilt, atol=1e-10, rtol=1e-10)
    if causal:
        assert (weights.triu(1) == 0).all()
    if documents:
        assert (weights[0, :, :5, 5:] == 0).all() and (weights[0, :, 5:, :5] == 0).all()
    assert mha(x, x, x, is_causal=causal, document_ids=ids)[1].shape == (2, 16, 16)  # averaged over heads
