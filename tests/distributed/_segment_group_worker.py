"""Worker of test_segment_groups.py: a dilated call computed in segment groups on 2 ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def grouped_against_reference(rank: int, world: int) -> dict:
    """Largest relative error of the output and of dq/dk/dv (summed over ranks) against the float64
    reference, per (layout, documents, group size), and how many tasks ran in several groups."""
    from ring_lightning.attention import create_ring_attention, ring
    from ring_lightning.attention.reference import reference_attention

    g = torch.Generator().manual_seed(0)
    B, N, H, K, D = 2, 128, 4, 2, 8
    q = torch.randn(B, N, H, D, dtype=torch.float64, generator=g).requires_grad_()
    k = torch.randn(B, N, K, D, dtype=torch.float64, generator=g).requires_grad_()
    v = torch.randn(B, N, K, D, dtype=torch.float64, generator=g).requires_grad_()
    grad = torch.randn(B, N, H, D, dtype=torch.float64, generator=g)
    segs, rates = [8, 16, 64], [1, 2, 4]
    packed = torch.tensor([[0] * 40 + [1] * 60 + [2] * 28, [0] * 81 + [1] * 47])
    groups_seen, errors = [], {}
    choose = ring._segment_groups

    def spy(*args):
        chosen = choose(*args)
        groups_seen.append(len(chosen))
        return chosen

    ring._segment_groups = spy
    try:
        for layout in ("contiguous", "zigzag"):
            for docs in (None, packed):
                for tokens in (2**18, 8):  # all at once; a few segments per group
                    ring.SEGMENT_GROUP_TOKENS = tokens
                    attn = create_ring_attention("standard", segment_lengths=segs, dilation_rates=rates,
                                                 compute_block_size=4, layout=layout)
                    out = attn(q, k, v, is_causal=True, document_ids=docs)
                    grads = [x.clone() for x in torch.autograd.grad(out, (q, k, v), grad)]
                    for x in grads:
                        dist.all_reduce(x)  # each rank's gradient of the full inputs: summed
                    ref = reference_attention(q, k, v, True, segs, rates, document_ids=docs)[0]
                    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
                    key = (layout, docs is not None, tokens)
                    errors[key] = max([rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads)])
    finally:
        ring._segment_groups = choose
        ring.SEGMENT_GROUP_TOKENS = 2**18
    return {"errors": errors, "grouped_tasks": sum(n > 1 for n in groups_seen)}
