"""Unit tier: the attention engine on one device (no process group)."""

from __future__ import annotations

import math

import pytest
import torch

from ring_lightning.attention import (
    BlockSparseRingAttention, MultiheadRingAttention, RingAttentionConfig, create_ring_attention,
    reference_attention,
)
from ring_lightning.attention.hilbert import hilbert_cell, hilbert_index, hilbert_order
from ring_lightning.attention.merge import merge_
from ring_lightning.sequence.sharding import (
    pad_to_multiple, sequence_positions, shard_sequence, unshard_sequence,
)

FLOAT64_REL_TOL = 1e-12  # same maths in float64: only summation order differs
HILBERT_REL_TOL = 1e-6  # the contract: hilbert equals standard to 1e-6 in float32
STATS_KEYS = {"total_time_ms", "compute_time_ms", "comm_time_ms", "comm_volume_mb", "peak_memory_mb",
              "ring_steps", "skipped_blocks"}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(B=2, N=32, H=4, K=2, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, N, h, D, generator=g, dtype=dtype, requires_grad=True)
    return mk(H), mk(K), mk(K)


# ------------------------------------------------------------------------------ merge
def test_merge_is_order_independent_and_equals_joint_softmax():
    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(3, 2, 4, generator=g) for _ in range(3)]
    lses = [torch.randn(3, 2, generator=g) for _ in range(3)]
    lses[1][0, 0] = float("-inf")  # a partial that saw no key
    results = []
    for order in ((0, 1, 2), (2, 0, 1)):
        acc_o, acc_l = torch.zeros(3, 2, 4), torch.full((3, 2), float("-inf"))
        for i in order:
            merge_(acc_o, acc_l, outs[i], lses[i])
        results.append((acc_o, acc_l))
    torch.testing.assert_close(results[0][0], results[1][0])
    weights = torch.softmax(torch.stack(lses), dim=0)
    torch.testing.assert_close(results[0][0], (weights[..., None] * torch.stack(outs)).sum(0))


def test_merge_of_empty_rows_stays_zero_not_nan():
    acc_o, acc_l = torch.zeros(2, 1, 3), torch.full((2, 1), float("-inf"))
    merge_(acc_o, acc_l, torch.full((2, 1, 3), float("nan")), torch.full((2, 1), float("-inf")))
    assert torch.isfinite(acc_o).all() and (acc_o == 0).all() and torch.isneginf(acc_l).all()


# ------------------------------------------------------------------- single device
@pytest.mark.parametrize("segs,rates", [(None, None), ([8, 16], [1, 2]), ([4, 8, 32], [1, 2, 4]), ([32], [3])])
@pytest.mark.parametrize("causal", [False, True])
def test_single_device_matches_reference_float64(segs, rates, causal):
    q, k, v = qkv(H=6, K=3)
    attn = create_ring_attention("standard", segment_lengths=segs, dilation_rates=rates, compute_block_size=8)
    out, lse = attn(q, k, v, is_causal=causal, return_lse=True)
    ref, ref_lse = reference_attention(q, k, v, causal, segs, rates)
    assert rel(out, ref) < FLOAT64_REL_TOL
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert rel(lse[fin], ref_lse[fin]) < FLOAT64_REL_TOL
    grad = torch.randn_like(out)
    mine = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b in zip(mine, theirs):
        assert rel(a, b) < FLOAT64_REL_TOL


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_a_task_computed_in_segment_groups_equals_it_computed_at_once(monkeypatch, causal, documents):
    """Large tasks (a dilated pattern batches every segment of the shard) run in groups of whole
    segments to bound their transients: the same outputs, statistics and gradients, and the reference's."""
    from ring_lightning.attention import ring

    q, k, v = qkv(B=2, N=64, H=4, K=2)
    segs, rates = [4, 8, 32], [1, 2, 4]
    grad = torch.randn(q.shape, dtype=q.dtype, generator=torch.Generator().manual_seed(3))
    # packed documents: rows of 3 and 2 documents, boundaries inside segments
    ids = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 41 + [1] * 23]) if documents else None
    results = []
    for group_tokens in (2**18, 8):  # all at once; about one segment of a batch per group
        monkeypatch.setattr(ring, "SEGMENT_GROUP_TOKENS", group_tokens)
        attn = create_ring_attention("standard", segment_lengths=segs, dilation_rates=rates, compute_block_size=4)
        out, lse = attn(q, k, v, is_causal=causal, return_lse=True, document_ids=ids)
        stats = attn.get_profiling_stats()
        results.append((out, lse, torch.autograd.grad(out, (q, k, v), grad),
                        (stats["computed_blocks"], stats["skipped_blocks"], stats["computed_tiles"])))
    (out_a, lse_a, grads_a, stats_a), (out_b, lse_b, grads_b, stats_b) = results
    ref, _ = reference_attention(q, k, v, causal, segs, rates, document_ids=ids)
    assert rel(out_b, ref) < FLOAT64_REL_TOL and rel(out_b, out_a) < FLOAT64_REL_TOL
    assert torch.equal(torch.isfinite(lse_a), torch.isfinite(lse_b))
    assert stats_a == stats_b
    theirs = torch.autograd.grad(ref, (q, k, v), grad)
    for a, b, c in zip(grads_a, grads_b, theirs):
        assert rel(b, a) < FLOAT64_REL_TOL and rel(b, c) < FLOAT64_REL_TOL


def test_dilated_rows_without_keys_output_zero_not_nan():
    # dilation 4 with 2 heads: offsets 2 and 3 have no head, and heads 0/1 see only their tokens
    q, k, v = qkv(H=2, K=2, N=16)
    out = create_ring_attention("standard", segment_lengths=[16], dilation_rates=[4])(q, k, v)
    assert torch.isfinite(out).all()
    assert (out[:, 1::4, 0] == 0).all()  # position 1 is not selected for head 0 (offset 0)


def test_segment_longer_than_sequence_is_clamped():
    q, k, v = qkv(N=16)
    a = create_ring_attention("standard", segment_lengths=[64])(q, k, v, is_causal=True)
    b = create_ring_attention("standard")(q, k, v, is_causal=True)
    assert rel(a, b) < FLOAT64_REL_TOL


def test_dropout_is_reproducible_and_its_gradient_is_exact():
    q, k, v = qkv(B=1, N=8, H=2, K=1, D=3)
    attn = create_ring_attention("standard", dropout=0.3, compute_block_size=4)

    def fn(q, k, v):
        torch.manual_seed(7)  # the module draws its dropout seed from the global generator
        return attn(q, k, v, is_causal=True)

    assert torch.equal(fn(q, k, v), fn(q, k, v))
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6)
    attn.eval()
    ref, _ = reference_attention(q, k, v, True)
    assert rel(attn(q, k, v, is_causal=True), ref) < FLOAT64_REL_TOL


# ------------------------------------------------------------------------ variants
def test_hilbert_curve_is_a_bijection_of_grid_neighbours():
    for level in (1, 2, 3, 5):
        n = 1 << level
        d = torch.arange(n * n)
        x, y = hilbert_cell(level, d)
        assert torch.equal(hilbert_index(level, x, y), d)
        steps = (x[1:] - x[:-1]).abs() + (y[1:] - y[:-1]).abs()
        assert (steps == 1).all()
    perm = hilbert_order(torch.arange(100), 3)
    assert sorted(perm.tolist()) == list(range(100))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("segs,rates", [(None, None), ([8, 32], [1, 2])])
def test_hilbert_equals_standard_float32(causal, segs, rates):
    q, k, v = qkv(N=32, dtype=torch.float32)
    kw = dict(segment_lengths=segs, dilation_rates=rates, compute_block_size=8)
    a = create_ring_attention("standard", **kw)(q, k, v, is_causal=causal)
    b = create_ring_attention("hilbert", hilbert_curve_level=2, **kw)(q, k, v, is_causal=causal)
    assert rel(b, a) < HILBERT_REL_TOL
    ga = torch.autograd.grad(a.sum(), (q, k, v))
    gb = torch.autograd.grad(b.sum(), (q, k, v))
    for x, y in zip(gb, ga):
        assert rel(x, y) < HILBERT_REL_TOL


@pytest.mark.parametrize("pattern", ["local_window", "dilated", "global_local", "random"])
def test_block_mask_is_deterministic_keeps_about_ratio_and_the_diagonal(pattern):
    a = create_ring_attention("block_sparse", block_size=8, sparsity_ratio=0.25, sparse_pattern=pattern)
    b = create_ring_attention("block_sparse", block_size=8, sparsity_ratio=0.25, sparse_pattern=pattern)
    m = a.block_mask(256)
    assert m.shape == (32, 32) and m.dtype == torch.bool
    assert torch.equal(m, b.block_mask(256))
    assert m.diagonal().all()
    assert 0.1 <= m.float().mean().item() <= 0.4


def test_block_sparse_computes_exactly_the_kept_blocks():
    q, k, v = qkv(B=1, N=64, H=2, K=2, D=4)
    attn = create_ring_attention("block_sparse", block_size=8, sparsity_ratio=0.3, sparse_pattern="random")
    out = attn(q, k, v)
    mask = attn.block_mask(64)
    assert attn.get_profiling_stats()["computed_tiles"] == int(mask.sum())
    ref, _ = reference_attention(q, k, v, False, block_mask=mask, block_size=8)
    assert rel(out, ref) < FLOAT64_REL_TOL


def test_distributed_mixed_precision_stays_within_bf16_tolerance():
    q, k, v = qkv(N=64, dtype=torch.float32)
    ref, _ = reference_attention(q, k, v, True)
    attn = create_ring_attention("distributed", enable_mixed_precision=True, attention_dtype="bfloat16")
    out = attn(q, k, v, is_causal=True)
    assert out.dtype == torch.float32
    assert 1e-4 < rel(out, ref) < 2e-2  # really computed in bf16, and still close


def test_validate_gradients_raises_naming_rank_and_module():
    q, k, v = qkv(N=8, dtype=torch.float32)
    attn = create_ring_attention("distributed", validate_gradients=True)
    out = attn(q, k, v)
    with pytest.raises(FloatingPointError, match="rank 0: DistributedRingAttention"):
        out.backward(torch.full_like(out, float("nan")))


@pytest.mark.parametrize("variant, fields", [
    ("standard", {}), ("hilbert", {}), ("block_sparse", {"block_size": 8, "sparsity_ratio": 0.5}),
])
def test_every_variant_honours_the_execution_options(variant, fields):
    """Mixed precision and gradient validation are options, not a feature of ``distributed``."""
    q, k, v = qkv(N=64, dtype=torch.float32)
    exact = create_ring_attention(variant, **fields)(q, k, v, is_causal=True)
    mixed = create_ring_attention(variant, enable_mixed_precision=True, **fields)(q, k, v, is_causal=True)
    assert mixed.dtype == torch.float32 and 1e-4 < rel(mixed, exact) < 2e-2  # computed in bf16, still close
    attn = create_ring_attention(variant, validate_gradients=True, **fields)
    qg = q.clone().requires_grad_()
    out = attn(qg, k, v, is_causal=True)
    with pytest.raises(FloatingPointError, match=f"rank 0: {type(attn).__name__}"):
        out.backward(torch.full_like(out, float("nan")))


# --------------------------------------------------------------------- API & errors
def test_usage_guide_calls_work():
    cfg = RingAttentionConfig(segment_lengths=[2048, 4096], dilation_rates=[1, 2], dropout=0.1)
    assert create_ring_attention("hilbert", config=cfg).config.dropout == 0.1
    m = create_ring_attention("standard", embed_dim=32, num_heads=4, segment_lengths=[8, 16], dilation_rates=[1, 2],
                              batch_first=True)
    assert isinstance(m, MultiheadRingAttention)
    out, weights = m(torch.randn(2, 16, 32), need_weights=False, is_causal=True)
    assert out.shape == (2, 16, 32) and weights is None
    attn = create_ring_attention("standard", enable_profiling=True)
    attn(*qkv(N=8)[:3])
    assert STATS_KEYS <= set(attn.get_profiling_stats())
    attn.clear_memory_pool()
    assert isinstance(create_ring_attention("block_sparse"), BlockSparseRingAttention)


@pytest.mark.parametrize("fields,match", [
    (dict(segment_lengths=[8, 16], dilation_rates=[1]), "same length"),
    (dict(segment_lengths=[0]), "segment_lengths"),
    (dict(dilation_rates=[2]), "needs segment_lengths"),
    (dict(layout="diagonal"), "layout"),
    (dict(sparsity_ratio=0.0), "sparsity_ratio"),
    (dict(sparse_pattern="checker"), "sparse_pattern"),
    (dict(compression_method="zip"), "compression_method"),
    (dict(attention_dtype="int8"), "attention_dtype"),
    (dict(custom_ring_order=[0, 0]), "custom_ring_order"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config_names_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        RingAttentionConfig(**fields)


def test_unknown_variant_and_field_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid variants"):
        create_ring_attention("ring_of_fire")
    with pytest.raises(TypeError, match="valid fields"):
        create_ring_attention("standard", segment_length=[8])


def test_field_without_effect_warns():
    with pytest.warns(UserWarning, match="use_hilbert"):
        create_ring_attention("standard", use_hilbert=True)
    with pytest.warns(UserWarning, match="attention_dtype"):
        create_ring_attention("distributed", attention_dtype="float16")
    with pytest.warns(UserWarning, match="compute_block_size"):
        create_ring_attention("block_sparse", compute_block_size=64)


def test_use_hilbert_turns_standard_into_hilbert():
    with pytest.warns(UserWarning, match="use_hilbert"):
        attn = create_ring_attention("standard", use_hilbert=True, hilbert_curve_level=2)
    assert attn.variant == "hilbert"
    with pytest.warns(UserWarning, match="use_hilbert"):
        mha = create_ring_attention(config=RingAttentionConfig(use_hilbert=True), embed_dim=8, num_heads=2)
    assert mha.attention.variant == "hilbert"
    q, k, v = qkv(dtype=torch.float32)
    ref = create_ring_attention("standard")(q, k, v, is_causal=True)
    assert rel(attn(q, k, v, is_causal=True), ref) < HILBERT_REL_TOL


def test_bad_inputs_say_what_is_wrong():
    attn = create_ring_attention("standard", segment_lengths=[16])
    q, k, v = qkv(N=24)
    with pytest.raises(ValueError, match="pad 8 more"):
        attn(q, k, v)
    q, k, v = qkv(H=3, K=2)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        attn(q, k, v)
    q, k, v = qkv()
    with pytest.raises(TypeError, match="share a dtype"):
        attn(q, k.float(), v)
    with pytest.raises(ValueError, match="shape"):
        attn(q[0], k, v)
    with pytest.raises(ValueError, match="does not match"):
        attn(q, k[:, :16], v[:, :16])
    with pytest.raises(TypeError, match="dtype"):
        attn(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="kv heads"):
        attn(q, k[:, :, :0], v[:, :, :0])
    with pytest.raises(ValueError, match="ring_size"):
        create_ring_attention("standard", ring_size=2)(q, k, v)


# ------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_unshard_round_trip_and_positions(layout):
    x = torch.arange(24).view(1, 24)
    shards = [shard_sequence(x, 3, r, layout) for r in range(3)]
    assert torch.equal(unshard_sequence(shards, layout), x)
    for r, s in enumerate(shards):
        assert torch.equal(s[0], sequence_positions(24, 3, r, layout))
    if layout == "zigzag":
        assert sequence_positions(24, 3, 0, layout).tolist() == [0, 1, 2, 3, 20, 21, 22, 23]


def test_pad_to_multiple_and_indivisible_length_message():
    assert pad_to_multiple(torch.ones(1, 10), 8).shape == (1, 16)
    with pytest.raises(ValueError, match="pad 2 more"):
        shard_sequence(torch.ones(1, 10), 2, 0, "zigzag")


# the one-device fused path's table: tests/unit/attention/test_route.py
