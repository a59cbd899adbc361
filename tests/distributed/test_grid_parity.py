"""Token grids: the hilbert variant with a grid window equals the float64 reference with the
same neighbourhood mask, in every token order (curve, frames, raster), on 1, 2 and 4 gloo ranks.

Tiny grids (8x8 and 2x4x4), causal and not, both layouts, already_split both ways, GQA;
outputs, lse and input gradients, float32 against float64 at 1e-5. The reference builds
the mask from its definition in raster order (``reference.grid_window_mask``, no code shared
with grids.py), so the curve's permutation, its inverse and the per-tile masks are all checked. Plus: pieces
out of the window's reach send nothing.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest

import conftest

pytestmark = pytest.mark.distributed

FLOAT32_REL_TOL = 1e-5
GRIDS = {"8x8-r1x2": ([8, 8], [1, 2]), "2x4x4-r1": ([2, 4, 4], [1, 1, 1])}


def build_cases(world: int):
    # every order, causal or not, both layouts on shards; the full sequence (already_split=False)
    # once per order and grid, causal, contiguous
    combos = [(c, lay, True) for c in (True, False) for lay in ("contiguous", "zigzag")] + [(True, "contiguous", False)]
    cases = []
    for (gname, (shape, window)), (causal, layout, split) in itertools.product(GRIDS.items(), combos):
        for order in ("hilbert", "raster") + (("frames",) if len(shape) == 3 else ()):
            fields = dict(layout=layout, grid_shape=shape, grid_window=window, grid_order=order,
                          compute_block_size=4)  # tiles of 4 tokens: the curve and tile skipping matter
            cid = f"W{world}-{gname}-{order}-{'causal' if causal else 'full'}-{layout}-{'split' if split else 'full_seq'}"
            cases.append(dict(id=cid, B=2, N=math.prod(shape), H=4, K=2, D=4, causal=causal, split=split,
                              variant="hilbert", fields=fields))
    return cases


@functools.lru_cache(maxsize=None)
def results_for(world: int):
    return conftest.run_parity_cases(world, build_cases(world))


PARAMS = [(w, c["id"]) for w in (1, 2, 4) for c in build_cases(w)]


@pytest.mark.parametrize("world,case_id", PARAMS, ids=[p[1] for p in PARAMS])
def test_grid_window_matches_reference(world, case_id):
    conftest.assert_matches_reference(results_for(world), case_id, FLOAT32_REL_TOL)


def test_pieces_out_of_reach_send_nothing():
    """8x8 grid, radius 1 in rows, on 4 contiguous ranks (two rows each): a rank needs the
    keys of its neighbours only, so the first and last rank receive from one rank, the
    middle ones from two, and nobody's keys travel to a rank two pieces away."""
    res = results_for(4)
    cid = "W4-8x8-r1x2-hilbert-full-contiguous-split"
    partners = [res[rank][cid]["stats"]["steps"] for rank in range(4)]
    volumes = [res[rank][cid]["stats"]["comm_volume_mb"] for rank in range(4)]
    assert volumes[0] > 0 and volumes[0] == volumes[3] and volumes[1] == volumes[2] == 2 * volumes[0], (volumes, partners)
