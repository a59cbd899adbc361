"""Token grids (attention/grids.py): the curve, the config's checks, the exact block masks,
and the kept-block counts of Hilbert vs raster order with the same window.

Ring parity of the hilbert variant with a grid (1, 2, 4 ranks) is in
tests/distributed/test_grid_parity.py; the one-GPU FlexAttention call in tests/gpu.
"""

from __future__ import annotations

import math

import pytest
import torch

from ring_lightning.attention import RingAttentionConfig, create_ring_attention, reference_attention
from ring_lightning.attention.grids import TokenGrid, gilbert_cells, kernel_positions, window_block_masks
from ring_lightning.attention.hilbert import hilbert_cell
from ring_lightning.attention.reference import grid_window_mask

FLOAT64_REL_TOL = 1e-12


def raster(cells, shape):
    strides = torch.tensor([math.prod(shape[i + 1:]) for i in range(len(shape))])
    return (cells * strides).sum(-1)


# ---------------------------------------------------------------------------------- curve
@pytest.mark.parametrize("shape", [(8, 8), (5, 7), (7, 5), (1, 9), (6, 10), (2, 4, 4), (4, 6, 8), (3, 5, 7),
                                   (1, 4, 4), (2, 1, 6), (16, 8, 2)])
def test_gilbert_visits_every_cell_once(shape):
    cells = gilbert_cells(shape)
    assert torch.equal(raster(cells, shape).sort().values, torch.arange(math.prod(shape)))
    steps = (cells[1:] - cells[:-1]).abs().sum(-1)
    if len(shape) == 2 or all(s % 2 == 0 or s == 1 for s in shape):
        assert bool((steps == 1).all()), "consecutive cells are grid neighbours"


@pytest.mark.parametrize("level", [1, 2, 3, 5])
def test_gilbert_on_a_power_of_two_square_is_the_hilbert_curve(level):
    n = 1 << level
    x, y = hilbert_cell(level, torch.arange(n * n))  # the independent classical construction
    assert torch.equal(gilbert_cells((n, n)), torch.stack([y, x], dim=-1))


# --------------------------------------------------------------------------------- config
@pytest.mark.parametrize("fields,match", [
    (dict(grid_shape=[8, 8]), "grid_shape and grid_window go together"),
    (dict(grid_window=2), "grid_shape and grid_window go together"),
    (dict(grid_shape=[64], grid_window=2), r"\[H, W\] or \[T, H, W\]"),
    (dict(grid_shape=[8, 0], grid_window=2), "positive integers"),
    (dict(grid_shape=[8, 8], grid_window=[1, 2, 3]), "one per grid dim"),
    (dict(grid_shape=[8, 8], grid_window=-1), "non-negative"),
    (dict(grid_shape=[8, 8], grid_window=1, grid_order="zorder"), "valid values: \\('hilbert', 'frames', 'raster'\\)"),
    (dict(grid_shape=[8, 8], grid_window=1, grid_order="frames"), "is 2-D"),
    (dict(grid_shape=[8, 8], grid_window=1, segment_lengths=[16]), "segment_lengths=None"),
])
def test_bad_grid_fields_name_the_field(fields, match):
    with pytest.raises(ValueError, match=match):
        RingAttentionConfig(**fields)


def test_grid_fields_normalise_and_warn_outside_hilbert():
    cfg = RingAttentionConfig(grid_shape=(2, 4, 4), grid_window=1)
    assert cfg.grid_shape == [2, 4, 4] and cfg.grid_window == [1, 1, 1]
    with pytest.warns(UserWarning, match="grid_shape.*no effect in the 'standard'"):
        create_ring_attention("standard", grid_shape=[8, 8], grid_window=1)
    with pytest.warns(UserWarning, match="hilbert_curve_level has no effect with grid_shape"):
        create_ring_attention("hilbert", grid_shape=[8, 8], grid_window=1, hilbert_curve_level=3)


def test_grid_must_hold_the_sequence_and_takes_no_documents():
    attn = create_ring_attention("hilbert", grid_shape=[8, 8], grid_window=1)
    q = torch.randn(1, 60, 2, 4)
    with pytest.raises(ValueError, match=r"holds 64 tokens but the sequence has 60"):
        attn(q, q, q)
    q = torch.randn(1, 64, 2, 4)
    with pytest.raises(ValueError, match="document_ids cannot be combined with grid_shape"):
        attn(q, q, q, document_ids=torch.zeros(1, 64, dtype=torch.long))


# ---------------------------------------------------------------------------- block masks
def brute_block_masks(grid, seq, bs, causal):
    """(kept, full) by evaluating every token pair of the sequence ``seq`` (raster positions)."""
    ok = grid_window_mask(grid.shape, grid.radius)[seq][:, seq]  # (N, N) in sequence order
    if causal:
        ok &= seq[None, :] <= seq[:, None]
    n = seq.numel()
    nb = -(-n // bs)
    kept = torch.zeros(nb, nb, dtype=torch.bool)
    full = torch.zeros(nb, nb, dtype=torch.bool)
    for a in range(nb):
        for b in range(nb):
            tile = ok[a * bs:(a + 1) * bs, b * bs:(b + 1) * bs]
            kept[a, b], full[a, b] = tile.any(), tile.all()
    return kept, full


@pytest.mark.parametrize("shape,radius", [((8, 8), (1, 1)), ((12, 20), (3, 1)), ((9, 7), (2, 2)),
                                          ((2, 4, 4), (1, 1, 1)), ((4, 8, 8), (1, 2, 2))])
@pytest.mark.parametrize("order", ["hilbert", "raster"])
@pytest.mark.parametrize("causal", [False, True])
def test_window_block_masks_are_exact(shape, radius, order, causal):
    grid = TokenGrid(shape, radius, order)
    seq = kernel_positions(grid)
    for bs in (4, 16, 24):  # 24: blocks that do not divide the sequence
        kept, full = window_block_masks(grid, seq, bs, causal)
        bkept, bfull = brute_block_masks(grid, seq, bs, causal)
        assert torch.equal(kept, bkept) and torch.equal(full, bfull), bs


# Kept (query block, key block) pairs, the same window in every order, non-causal (exact
# counts; grids of 64K tokens are in docs/ARCHITECTURE.md, "Token grids").
KEPT_BLOCKS = {
    ((64, 64), (8, 8), 64): {"hilbert": 484, "raster": 1016},  # of 64^2 = 4096 block pairs
    ((8, 32, 32), (1, 4, 4), 128): {"hilbert": 604, "frames": 836, "raster": 484},  # of 4096
    ((8, 32, 32), (2, 2, 2), 128): {"hilbert": 604, "frames": 1292, "raster": 748},
}


def test_hilbert_order_keeps_fewer_blocks_than_raster_for_the_same_window():
    for (shape, radius, bs), by_order in KEPT_BLOCKS.items():
        for order, expected in by_order.items():
            grid = TokenGrid(shape, radius, order)
            kept, _ = window_block_masks(grid, kernel_positions(grid), bs, causal=False)
            assert int(kept.sum()) == expected, (shape, radius, order)
    # 2-D: the curve keeps 2.1x fewer blocks; 3-D with a window short in time, raster wins
    assert KEPT_BLOCKS[((64, 64), (8, 8), 64)]["hilbert"] * 2 < KEPT_BLOCKS[((64, 64), (8, 8), 64)]["raster"]


def test_portable_kernel_skips_the_tiles_the_curve_empties():
    """On CPU (the ring's portable kernel, tiles of 16 tokens) the curve computes 484 tiles
    where raster order computes 1072 for the same 32x32 window of radius 4 (exactly the kept
    blocks), with the same result."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1024, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref, _ = reference_attention(q, k, v, grid_shape=(32, 32), grid_window=(4, 4))
    tiles = {}
    for order in ("hilbert", "raster"):
        attn = create_ring_attention("hilbert", grid_shape=[32, 32], grid_window=4, grid_order=order,
                                     compute_block_size=16)
        out = attn(q, k, v)
        assert ((out - ref).norm() / ref.norm()).item() < FLOAT64_REL_TOL, order
        tiles[order] = attn.get_profiling_stats()["computed_tiles"]
    assert tiles == {"hilbert": 484, "raster": 1072}


# ------------------------------------------------------------------------ FlexAttention
flex = pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.parametrize("order", ["hilbert", "raster"])
@pytest.mark.parametrize("causal", [False, True])
def test_flex_grid_mask_equals_create_block_mask_and_the_reference(order, causal):
    """The one-GPU path's block mask (kernel order) is what create_block_mask finds, and CPU
    FlexAttention under it, permuted back, equals the reference (forward; no CPU backward)."""
    from ring_lightning.attention.grids import flex_grid_mask

    grid = TokenGrid((24, 32), (3, 5), order)
    order_idx, back, mask = flex_grid_mask(grid, causal, "cpu")
    n = grid.num_tokens
    slow = flex.create_block_mask(mask.mask_mod, 1, None, n, n, device="cpu")
    assert torch.equal(mask.kv_num_blocks, slow.kv_num_blocks)
    assert torch.equal(mask.full_kv_num_blocks, slow.full_kv_num_blocks)
    assert torch.equal(mask.to_dense(), slow.to_dense())
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    perm = (lambda x: x) if order_idx is None else (lambda x: x.index_select(1, order_idx))
    out = flex.flex_attention(*(perm(x).transpose(1, 2) for x in (q, k, v)), block_mask=mask).transpose(1, 2)
    out = out if back is None else out.index_select(1, back)
    ref, _ = reference_attention(q, k, v, causal, grid_shape=grid.shape, grid_window=grid.radius)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
