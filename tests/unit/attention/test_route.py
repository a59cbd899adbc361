"""Unit tier: the route of an attention call (route.py) as a table, and what decides it.

The choice is pure (it reads the call's description only), so the GPU routes (fused SDPA,
FlexAttention) are checked here on CPU: the modules' descriptions are built from CPU
tensors and moved to "cuda" by replacing one field.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from ring_lightning.attention import create_ring_attention
from ring_lightning.attention.kernel_policy import KernelPolicy
from ring_lightning.attention.route import AttentionCall, Route, choose_route

N = 16
DENSE = ((N, 1),)
CUDA_BF16 = dict(device_type="cuda", dtype=torch.bfloat16, flex_available=True)


def call(**fields) -> AttentionCall:
    base = dict(q_shape=(1, N, 2, 16), k_shape=(1, N, 2, 16), dtype=torch.float32, device_type="cpu",
                seq_len=N, patterns=DENSE)
    return AttentionCall(**{**base, **fields})


@pytest.mark.parametrize("fields, route", [
    ({}, Route.RING),  # CPU: the ring's portable kernels
    (CUDA_BF16, Route.SDPA),
    ({**CUDA_BF16, "is_causal": True}, Route.SDPA),
    ({**CUDA_BF16, "dtype": torch.float32}, Route.RING),  # fused kernels want half precision
    ({**CUDA_BF16, "return_lse": True}, Route.RING),  # SDPA does not give the log-sum-exp
    ({**CUDA_BF16, "world": 2, "rank": 1}, Route.RING),
    ({**CUDA_BF16, "kernel": "math"}, Route.RING),  # a kernel asked for by name is honoured
    ({**CUDA_BF16, "dropout_active": True}, Route.RING),
    ({**CUDA_BF16, "patterns": ((8, 1), (16, 2))}, Route.RING),  # dilated
    ({**CUDA_BF16, "options": {"grad_check": print}}, Route.RING),  # execution options need the ring
    ({**CUDA_BF16, "options": {"compute_dtype": torch.bfloat16}}, Route.RING),
    ({**CUDA_BF16, "options": {"tile": 64}}, Route.SDPA),  # a tile size changes nothing SDPA computes
    ({**CUDA_BF16, "masks": frozenset({"documents"})}, Route.FLEX),
    ({**CUDA_BF16, "masks": frozenset({"block_grid"})}, Route.FLEX),
    ({**CUDA_BF16, "masks": frozenset({"grid_window"}), "is_causal": True}, Route.FLEX),
    ({**CUDA_BF16, "masks": frozenset({"documents", "block_grid"})}, Route.FLEX),
    ({**CUDA_BF16, "masks": frozenset({"documents"}), "flex_available": False}, Route.RING),
    ({**CUDA_BF16, "masks": frozenset({"documents"}), "q_shape": (1, N, 2, 8)}, Route.RING),  # head dim < 16
    ({**CUDA_BF16, "masks": frozenset({"documents"}), "options": {"grad_check": print}}, Route.RING),
    ({**CUDA_BF16, "masks": frozenset({"documents"}), "return_lse": True}, Route.RING),
    ({"hybrid": True}, Route.HYBRID),
    ({**CUDA_BF16, "hybrid": True}, Route.HYBRID),  # the all-to-all first; the ring call inside is routed again
])
def test_route_table(fields, route):
    assert choose_route(call(**fields)) is route


@pytest.mark.parametrize("variant, fields, documents, route", [
    ("standard", {}, False, Route.SDPA),
    ("distributed", {}, False, Route.SDPA),
    ("distributed", {"enable_mixed_precision": True}, False, Route.SDPA),  # bf16 inputs: nothing to cast
    ("distributed", {"validate_gradients": True}, False, Route.RING),
    ("standard", {"segment_lengths": [8, 16], "dilation_rates": [1, 2]}, False, Route.RING),
    ("standard", {"kernel": "math"}, False, Route.RING),
    ("hilbert", {}, False, Route.SDPA),  # the curve orders tiles, not tokens: SDPA computes the same
    ("hilbert", {"grid_shape": [4, 4], "grid_window": 1}, False, Route.FLEX),
    ("block_sparse", {"block_size": 4, "sparsity_ratio": 0.5}, False, Route.FLEX),
    ("standard", {}, True, Route.FLEX),
    ("hilbert", {}, True, Route.FLEX),
    ("block_sparse", {"block_size": 4, "sparsity_ratio": 0.5}, True, Route.FLEX),
    ("distributed", {"validate_gradients": True}, True, Route.RING),
])
def test_each_variant_on_one_cuda_device_takes_the_route_its_declarations_allow(variant, fields, documents, route):
    """The one-device fast paths are taken exactly for what one fused call computes
    (benchmarks/bench_model.py measures the gain); every variant is routed by the same rule."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attn = create_ring_attention(variant, **fields)
    q = torch.randn(1, N, 2, 16, dtype=torch.bfloat16)
    ids = torch.zeros(1, N, dtype=torch.long) if documents else None
    described = attn.describe_call(q, q, is_causal=True, document_ids=ids)
    assert choose_route(described) is Route.RING  # on CPU tensors: always the ring
    assert choose_route(dataclasses.replace(described, device_type="cuda", flex_available=True)) is route


def test_the_variant_is_asked_its_options_once_per_call():
    attn = create_ring_attention("hilbert")
    asked = []
    original = attn._context_options
    attn._context_options = lambda *a: asked.append(1) or original(*a)
    q = torch.randn(1, N, 2, 8, dtype=torch.float64)
    attn(q, q, q, is_causal=True)
    assert len(asked) == 1


def test_kernel_refusals_belong_to_one_module():
    """A kernel that refused in one module does not change another module's choices."""
    first, second = create_ring_attention("standard"), create_ring_attention("standard")
    assert first.kernels is not second.kernels

    def refuse():
        raise RuntimeError("no kernel image for this architecture")

    with pytest.warns(RuntimeWarning, match="varlen refused"):
        assert first.kernels.try_varlen(refuse, "packed documents") is None
    assert first.kernels.varlen_refusal is not None and second.kernels.varlen_refusal is None
    assert first.kernels.refusals() and not second.kernels.refusals()


def test_a_kernel_named_in_the_config_warns_when_it_refuses_and_is_not_tried_again():
    policy = KernelPolicy("flash")
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="kernel='flash' refused"):
        policy.refuse("flash", q, RuntimeError("head dim"))
    assert ("flash", (torch.bfloat16, 8)) in policy.refused
    assert policy.refusals() == ["flash torch.bfloat16 head_dim=8"]


@pytest.mark.parametrize("variant, fields, documents", [
    ("block_sparse", {"block_size": 32, "sparsity_ratio": 0.3, "sparse_pattern": "random"}, False),
    ("block_sparse", {"block_size": 32, "sparsity_ratio": 0.3}, True),
    ("hilbert", {"grid_shape": [16, 16], "grid_window": 2}, False),
    ("standard", {}, True),
])
@pytest.mark.parametrize("causal", [True, False])
def test_the_flex_route_computes_what_the_masks_allow(variant, fields, documents, causal, monkeypatch):
    """The FLEX route's execution (execute.run_flex), with eager CPU FlexAttention standing in for
    the compiled GPU one: its block mask comes from the masks and equals the reference under them."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    from ring_lightning.attention import execute, reference_attention

    def eager(q, k, v, scale, block_mask):
        out = flex.flex_attention(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=block_mask, scale=scale)
        return out.transpose(1, 2)

    monkeypatch.setattr(execute, "flex_attention", eager)
    n = 256
    attn = create_ring_attention(variant, **fields)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 2, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    ids = torch.repeat_interleave(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]), torch.tensor([40, 100, 16, 100]), 1)
    ids = ids if documents else None
    call = attn.describe_call(q, k, is_causal=causal, document_ids=ids)
    out = execute.run_flex(attn, call, q, k, v, ids)
    ref, _ = reference_attention(q, k, v, causal, masks=list(attn._declared_masks(n)), document_ids=ids)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
