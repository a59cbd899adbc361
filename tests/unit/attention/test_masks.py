"""Unit tier: every registered mask kind answers the protocol's four questions consistently
(mask_protocol.py), against the reference's own definitions (reference.py).

A new mask kind adds its example to EXAMPLES; the last test fails until it does."""

from __future__ import annotations

import pytest
import torch

from ring_lightning.attention import mask_protocol
from ring_lightning.attention.documents import DocumentMask
from ring_lightning.attention.grids import GridWindowMask, TokenGrid
from ring_lightning.attention.mask_protocol import MASKS, CausalMask, MaskSet
from ring_lightning.attention.masks import BlockGridMask, build_block_mask
from ring_lightning.attention.reference import block_to_token_mask, grid_window_mask

N = 24
IDS = torch.tensor([[0] * 5 + [1] * 11 + [2] * 8, [3] * 12 + [4] * 12])  # (B, N) packed documents


def _definitions():
    """kind -> (mask, its (1|B, N, N) definition written independently of the mask)."""
    i = torch.arange(N)
    blocks = build_block_mask(N // 4, "random", 0.3, 1)
    return {
        "causal": (CausalMask(), (i[None, :] <= i[:, None])[None]),
        "block_grid": (BlockGridMask(blocks, 4), block_to_token_mask(blocks, 4)[None]),
        "grid_window": (GridWindowMask(TokenGrid((4, 6), (1, 2), "hilbert")), grid_window_mask((4, 6), (1, 2))[None]),
        "documents": (DocumentMask(IDS), IDS[:, :, None] == IDS[:, None, :]),
    }


EXAMPLES = _definitions()


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_dense_is_the_definition(kind):
    mask, definition = EXAMPLES[kind]
    assert torch.equal(mask.dense(N).expand_as(definition), definition)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_token_mask_of_any_positions_in_any_order_is_the_dense_mask_there(kind):
    mask, definition = EXAMPLES[kind]
    gen = torch.Generator().manual_seed(0)
    qpos = torch.stack([torch.randperm(N, generator=gen)[:7] for _ in range(2)])  # (S=2, M=7)
    kpos = torch.stack([torch.randperm(N, generator=gen)[:9] for _ in range(2)])  # (S=2, L=9)
    got = mask.token_mask(qpos, kpos)  # (1|B, S, M, L)
    want = definition[:, qpos[:, :, None], kpos[:, None, :]]  # (1|B, S, M, L)
    assert torch.equal(got.expand_as(want), want)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_a_pair_of_ranges_it_drops_holds_no_allowed_pair(kind):
    """``keeps`` may keep an empty pair (conservative), never drop a non-empty one; it does drop some."""
    mask, definition = EXAMPLES[kind]
    dropped = 0
    for q0 in range(0, N, 4):
        for k0 in range(0, N, 4):
            has_pair = bool(definition[:, q0:q0 + 4, k0:k0 + 4].any())
            if not mask.keeps((q0, q0 + 4), (k0, k0 + 4)):
                assert not has_pair, (q0, k0)
                dropped += 1
    assert dropped > 0


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_mask_mod_is_the_dense_mask(kind):
    mask, definition = EXAMPLES[kind]
    mod = mask.mask_mod()
    q, k = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    for b in range(definition.shape[0]):
        assert torch.equal(mod(torch.tensor(b), torch.tensor(0), q, k).expand(N, N), definition[b])


def test_masks_combine_by_and():
    masks = [EXAMPLES[k][0] for k in ("causal", "block_grid", "documents")]
    both = MaskSet(masks)
    definition = EXAMPLES["causal"][1] & EXAMPLES["block_grid"][1] & EXAMPLES["documents"][1]
    assert torch.equal(both.dense(N), definition)
    for q0, k0 in ((0, 0), (4, 12), (16, 4)):
        assert both.keeps((q0, q0 + 4), (k0, k0 + 4)) <= all(m.keeps((q0, q0 + 4), (k0, k0 + 4)) for m in masks)
    q, k = torch.meshgrid(torch.arange(N), torch.arange(N), indexing="ij")
    assert torch.equal(both.mask_mod()(torch.tensor(1), torch.tensor(0), q, k), definition[1])
    assert both.kinds == {"causal", "block_grid", "documents"}


def test_every_registered_kind_has_an_example():
    assert set(MASKS) == set(EXAMPLES), "add an example of the new mask kind to EXAMPLES"
    with pytest.raises(ValueError, match="registered twice"):
        mask_protocol.register_mask(type("Other", (mask_protocol.AttentionMask,), {"kind": "causal"}))


def test_the_reference_takes_a_mask_through_its_dense_answer():
    from ring_lightning.attention import create_ring_attention, reference_attention

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, N, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    grid = EXAMPLES["grid_window"][0]
    by_mask, _ = reference_attention(q, k, v, True, masks=[grid])
    by_fields, _ = reference_attention(q, k, v, True, grid_shape=[4, 6], grid_window=[1, 2])
    assert torch.equal(by_mask, by_fields)
    ring = create_ring_attention("hilbert", grid_shape=[4, 6], grid_window=[1, 2])(q, k, v, is_causal=True)
    assert ((ring - by_mask).norm() / by_mask.norm()).item() < 1e-12


class _Band(mask_protocol.AttentionMask):
    """A mask kind the package does not have: keys within ``width`` positions of the query."""

    kind = "test_band"

    def __init__(self, width: int) -> None:
        self.width = width

    def keeps(self, q_range, k_range) -> bool:
        return k_range[0] - (q_range[1] - 1) <= self.width and q_range[0] - (k_range[1] - 1) <= self.width

    def token_mask(self, qpos, kpos):
        return ((qpos[:, :, None] - kpos[:, None, :]).abs() <= self.width)[None]

    def mask_mod(self, device=None):
        return lambda b, h, q_idx, kv_idx: (q_idx - kv_idx <= self.width) & (kv_idx - q_idx <= self.width)


@pytest.fixture
def band_kind():
    mask_protocol.register_mask(_Band)
    yield _Band
    del MASKS[_Band.kind]


@pytest.mark.parametrize("variant, fields", [("standard", {}), ("hilbert", {}),
                                             ("block_sparse", {"block_size": 8, "sparsity_ratio": 0.5})])
def test_a_new_mask_kind_needs_only_its_class_and_registration(band_kind, variant, fields):
    """A variant declaring a mask the package does not know is exact on the ring's generic path
    (tile masks from ``token_mask``, ANDed with the variant's own masks) and its tasks are pruned
    by ``keeps``."""
    from ring_lightning.attention import create_ring_attention, reference_attention
    from ring_lightning.attention.plan import RingPlan

    band = band_kind(5)
    attn = create_ring_attention(variant, **fields)
    own = attn._declared_masks
    attn._declared_masks = lambda n: tuple(own(n)) + (band,)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 64, 2, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = attn(q, k, v, is_causal=True)
    variant_masks = list(own(64))
    ref, _ = reference_attention(q, k, v, True, masks=[band] + variant_masks)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    assert all(((a - b).norm() / b.norm()).item() < 1e-10 for a, b in zip(got, want))
    plan = MaskSet([band]).restrict(RingPlan(64, 4, "contiguous", [(64, 1)], False, 2, 2))
    assert [len(plan.tasks(0, s)) for s in range(4)] == [1, 1, 0, 0]  # pieces of 16: only the neighbour meets


def test_flops_count_any_mask_kind_from_its_answers():
    """flops.mask_pairs counts from token_mask alone; it agrees with the closed forms."""
    from ring_lightning.models.flops import attention_pairs, grid_window_pairs, mask_pairs

    blocks = EXAMPLES["block_grid"][0]
    for causal in (True, False):
        assert mask_pairs(N, [blocks], 3, causal=causal) == attention_pairs(
            N, 3, causal=causal, block_mask=blocks.blocks, block_size=4)
        assert mask_pairs(N, [EXAMPLES["grid_window"][0]], causal=causal) == grid_window_pairs(
            (4, 6), (1, 2), causal=causal)
    assert mask_pairs(N, [], 2, causal=True) == attention_pairs(N, 2, causal=True)
    assert mask_pairs(N, [EXAMPLES["causal"][0]], causal=False) == attention_pairs(N, causal=True) + N / 2
