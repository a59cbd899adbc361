"""bench_masks.py's token-grid rows and its packed-document load-balance section.

Grids (``grids <grid> r<radius> <row>``): one image (2-D) or video (3-D) of 64K patches,
non-causal box-window attention (``RingAttentionConfig.grid_window``), fwd+bwd:

  flex raster      the peer: compiled FlexAttention, create_block_mask of the same window in
                   the caller's (raster) order, as a user would write it
  hilbert / frames ring_lightning hilbert with grid_order=hilbert / frames (3-D): tokens laid
  / raster         along the curve (the one-GPU path: permute, FlexAttention under the exact
                   window block mask, permute back; the permutations are timed) or raster
  sdpa dense       F.scaled_dot_product_attention over every pair, for scale

Each row carries the exact kept and full 128-block pairs of its order (grids.window_block_masks)
and TFLOP/s of the allowed pairs only (flops.grid_window_pairs).

Balance (``balance``): causal packed documents, exact allowed pairs per rank at sp = 2, 4, 8
for the layouts of sharding.py and PyTorch's per-document head-tail balance (flops.py). CPU
counts, no timing.
"""

from __future__ import annotations

import torch

from _common import import_engine

attention, flops, grids = import_engine("attention", "models.flops", "attention.grids")

GPU_GRIDS = [  # (name, shape, radius, orders)
    ("256x256", (256, 256), (8, 8), ("hilbert", "raster")),
    ("256x256", (256, 256), (16, 16), ("hilbert", "raster")),
    ("16x64x64", (16, 64, 64), (1, 8, 8), ("hilbert", "frames", "raster")),
    ("16x64x64", (16, 64, 64), (2, 4, 4), ("hilbert", "frames", "raster")),
]
DRY_GRIDS = [("32x32", (32, 32), (4, 4), ("hilbert", "raster")),
             ("4x16x16", (4, 16, 16), (1, 2, 2), ("hilbert", "frames", "raster"))]


def kept_blocks(shape, radius, order, device) -> dict:
    grid = grids.TokenGrid(tuple(shape), tuple(radius), order)
    kept, full = grids.window_block_masks(grid, grids.kernel_positions(grid).to(device), 128, causal=False)
    return dict(kept_blocks=round(float(kept.float().mean()), 5), kept_block_pairs=int(kept.sum()),
                full_block_pairs=int(full.sum()), block_pairs=kept.numel())


def grid_rows(row, wanted, cuda: bool, dev, dtype, H: int, D: int) -> None:
    """Adds the grid rows through bench_masks' ``row(name, n, step, pairs, peer, **extra)``;
    a grid none of whose rows is ``wanted(name)`` is not even set up."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention
    for gname, shape, radius, orders in (GPU_GRIDS if cuda else DRY_GRIDS):
        n = 1
        for s in shape:
            n *= s
        tag = f"grids {gname} r{'x'.join(map(str, radius))}"
        if not any(wanted(f"{tag} {what}") for what in ("sdpa dense", "flex raster") + orders):
            continue
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(1, n, H, D, generator=g).to(dev, dtype) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def grads(out):
            return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))

        pairs = flops.grid_window_pairs(shape, radius, H)
        dense = torch.nn.functional.scaled_dot_product_attention
        row(f"{tag} sdpa dense", n, lambda: grads(dense(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                                                  .transpose(1, 2)), flops.attention_pairs(n, H, causal=False))
        cells = grids.TokenGrid(tuple(shape), tuple(radius), "raster").coords(torch.arange(n)).to(dev)
        dims = [cells[:, i].contiguous() for i in range(len(shape))]

        def window(b, h, qi, ki):
            keep = qi >= 0
            for c, r in zip(dims, radius):
                keep = keep & (c[qi] - c[ki] <= r) & (c[ki] - c[qi] <= r)
            return keep

        def flex_peer():
            mask = create_block_mask(window, None, None, n, n, device=dev, _compile=cuda)
            return lambda: grads(flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      block_mask=mask).transpose(1, 2))

        peer = row(f"{tag} flex raster", n, flex_peer(), pairs, **kept_blocks(shape, radius, "raster", dev))
        for order in sorted(orders, key=lambda o: o != "raster"):  # raster first: the CPU peer
            attn = attention.create_ring_attention("hilbert", grid_shape=list(shape), grid_window=list(radius),
                                                   grid_order=order, compute_block_size=128)
            result = row(f"{tag} {order}", n, lambda attn=attn: grads(attn(q, k, v, already_split=True)), pairs,
                         peer, **kept_blocks(shape, radius, order, dev))
            # CPU FlexAttention has no backward: there the curve rows are checked against raster order
            peer = result if peer is None else peer
        del peer, q, k, v, dout
        if cuda:
            torch.cuda.empty_cache()


def document_lengths(n: int, mean: int, multiple: int = 1, seed: int = 0) -> list:
    """Packed document lengths ~ exponential(mean), rounded up to ``multiple``, summing to n."""
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n:
        draw = max(1, int(torch.empty(1).exponential_(1.0 / mean, generator=g)))
        lengths.append(-(-draw // multiple) * multiple)
    lengths[-1] -= sum(lengths) - n
    return lengths


def balance_rows(cuda: bool) -> list:
    """Causal work per rank of packed documents (exact pairs, one head) for each layout."""
    n, means = (131072, (1024, 8192)) if cuda else (4096, (64, 256))
    rows = []
    for mean in means:
        lengths = document_lengths(n, mean, multiple=16)  # 16 = 2W at sp = 8: the per-document cut applies
        for world in (2, 4, 8):
            for layout in ("contiguous", "zigzag", flops.PER_DOCUMENT):
                work = flops.causal_document_pairs_per_rank(lengths, world, layout)
                rows.append(dict(name=f"balance docs~{mean} sp={world} {layout}", n=n, documents=len(lengths),
                                 mean_length=mean, sp=world, layout=layout, pairs_per_rank=work,
                                 max_over_mean=max(work) * world / sum(work)))
    return rows


def balance_table(rows: list) -> list:
    lines = ["", "## Causal load balance of packed documents: allowed pairs per rank (exact, CPU)", "",
             "Documents ~ exponential lengths (rounded to multiples of 16), causal. max/mean = the slowest rank's "
             "work over the average; `per_document` = PyTorch's per-document head-tail balance (not a layout of "
             "ring_lightning: see docs/ARCHITECTURE.md).", "",
             "| N | docs (mean length) | sp | layout | max/mean | work per rank / mean |", "|---|---|---|---|---|---|"]
    for r in rows:
        mean = sum(r["pairs_per_rank"]) / r["sp"]
        shares = ", ".join(f"{x / mean:.2f}" for x in r["pairs_per_rank"])
        lines.append(f"| {r['n']} | {r['documents']} ({r['mean_length']}) | {r['sp']} | {r['layout']} | "
                     f"{r['max_over_mean']:.3f} | {shares} |")
    return lines
