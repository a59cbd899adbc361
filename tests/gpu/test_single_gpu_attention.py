"""GPU tier: attention on one GPU (no process group) equals the float64 reference in bf16.

Dense patterns take the fused SDPA kernel directly (route.Route.SDPA, tests/unit/attention/test_route.py);
dilated ones take the ring's general path. Both must match the brute-force reference,
outputs and input gradients. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from ring_lightning.attention import create_ring_attention, reference_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16_TOL = 2e-2  # relative L2 error of bf16 operands (float32 accumulation) against float64


def _inputs(B=2, N=1024, H=8, K=4, D=64):
    """bf16 q (B,N,H,D), k, v (B,N,K,D) needing grad, and an output gradient, seeded."""
    torch.manual_seed(0)
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, N, K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, N, K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return q, k, v, torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("fields", [{}, {"segment_lengths": [256, 1024], "dilation_rates": [1, 2]}],
                         ids=["dense-fused", "dilated-ring"])
def test_one_gpu_bf16_matches_float64_reference(is_causal, fields):
    q, k, v, dout = _inputs()
    attn = create_ring_attention("standard", **fields)
    out = attn(q, k, v, is_causal=is_causal, already_split=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, _ = reference_attention(q64, k64, v64, is_causal=is_causal, **fields)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert _rel(out, ref) < BF16_TOL
    for name, g, r in zip("qkv", grads, ref_grads):
        assert _rel(g, r) < BF16_TOL, name
    assert attn.get_profiling_stats()["calls"] == 1


def _docs(B, N, seed=0):
    """Packed rows: random document lengths (one-token documents included)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(B):
        lengths = [1]
        while sum(lengths) < N:
            lengths.append(int(torch.randint(1, N // 4, (1,), generator=g)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:N])
    return torch.stack(rows).cuda()


CASES = {  # name -> (variant, fields, documents): which one-GPU path each takes
    "documents-flex": ("standard", {}, True),
    "documents-varlen": ("standard", {"kernel": "flash"}, True),  # the ring's per-task varlen kernel
    "documents-dilated-varlen": ("standard", {"segment_lengths": [256, 1024], "dilation_rates": [1, 2]}, True),
    "documents-hilbert": ("hilbert", {}, True),
    "block_sparse-flex": ("block_sparse", {"block_size": 128, "sparsity_ratio": 0.25,
                                           "sparse_pattern": "local_window"}, False),
    "block_sparse-documents-flex": ("block_sparse", {"block_size": 128, "sparsity_ratio": 0.25,
                                                     "sparse_pattern": "random"}, True),
    "hilbert-dense": ("hilbert", {}, False),
    # token grids (32x32 and 4x16x16 = N): FlexAttention under the window's block mask, curve order
    "grid-hilbert-flex": ("hilbert", {"grid_shape": [32, 32], "grid_window": [4, 2]}, False),
    "grid-raster-flex": ("hilbert", {"grid_shape": [32, 32], "grid_window": [4, 2], "grid_order": "raster"}, False),
    "grid-3d-frames-flex": ("hilbert", {"grid_shape": [4, 16, 16], "grid_window": [1, 3, 3], "grid_order": "frames"},
                            False),
}


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_one_gpu_masks_bf16_match_float64_reference(case, is_causal):
    variant, fields, documents = CASES[case]
    B, N, (q, k, v, dout) = 2, 1024, _inputs()
    ids = _docs(B, N) if documents else None
    attn = create_ring_attention(variant, **fields)
    out = attn(q, k, v, is_causal=is_causal, already_split=True, document_ids=ids)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    extra = {}
    if variant == "block_sparse":
        extra = dict(block_mask=attn.block_mask(N), block_size=fields["block_size"])
    if "grid_shape" in fields:
        extra = dict(grid_shape=fields["grid_shape"], grid_window=attn.config.grid_window)
    ref, _ = reference_attention(q64, k64, v64, is_causal, attn.config.segment_lengths, attn.config.dilation_rates,
                                 document_ids=ids, **extra)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    assert _rel(out, ref) < BF16_TOL
    for name, g, r in zip("qkv", grads, ref_grads):
        assert _rel(g, r) < BF16_TOL, name
