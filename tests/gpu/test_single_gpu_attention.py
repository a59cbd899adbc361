"""GPU tier: attention on one GPU (no process group) equals the float64 reference in bf16.

Dense patterns take the fused SDPA kernel directly (``RingAttentionBase._fused_single_device``);
dilated ones take the ring's general path. Both must match the brute-force reference,
outputs and input gradients. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from ring_lightning.attention import create_ring_attention, reference_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
BF16_TOL = 2e-2  # relative L2 error of bf16 operands (float32 accumulation) against float64


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("fields", [{}, {"segment_lengths": [256, 1024], "dilation_rates": [1, 2]}],
                         ids=["dense-fused", "dilated-ring"])
def test_one_gpu_bf16_matches_float64_reference(is_causal, fields):
    torch.manual_seed(0)
    B, N, H, K, D = 2, 1024, 8, 4, 64
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, N, K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, N, K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
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
