"""Rank-side code of the ring parity tests (imported by spawned gloo processes).

Each rank builds the same full inputs from a seed, computes the float64 brute-force
reference on the whole sequence, runs the ring on its shard (or on the full sequence with
already_split=False) and returns relative errors on ITS positions. The test takes the
maximum over ranks.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from ring_lightning.attention import create_ring_attention, reference_attention
from ring_lightning.sequence.sharding import sequence_sharding, shard_sequence


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    if not bool((torch.isfinite(a) == fin).all()):
        return float("inf")  # -inf lse where the reference has a key, or NaN
    denom = b[fin].norm().item() or 1.0
    return (a[fin] - b[fin]).norm().item() / denom


def make_inputs(case: dict, dtype=torch.float32):
    g = torch.Generator().manual_seed(case.get("seed", 0))
    B, N, H, K, D = case["B"], case["N"], case["H"], case["K"], case["D"]
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, K, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, K, D, generator=g, dtype=torch.float64)
    grad = torch.randn(B, N, H, D, generator=g, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype), grad.to(dtype)


def document_ids_for(case: dict):
    """(B, N) ids for ``case["docs"]``: None; "packed" (random lengths 1..N/3, so documents
    cross rank boundaries and one-token documents occur); "unpacked" (ids in any order);
    "per_piece" (one document per rank piece: nothing crosses a boundary)."""
    kind = case.get("docs")
    if kind is None:
        return None
    B, N = case["B"], case["N"]
    g = torch.Generator().manual_seed(case.get("seed", 0) + 1)
    if kind == "unpacked":
        return torch.randint(0, 3, (B, N), generator=g)
    if kind == "per_piece":
        from ring_lightning.sequence.sharding import rank_pieces
        ids = torch.empty(B, N, dtype=torch.long)
        for r in range(case["world"]):
            for i, p in enumerate(rank_pieces(N, case["world"], r, case["layout"])):
                ids[:, p.start:p.start + p.length] = 2 * r + i
        return ids
    rows = []
    for _ in range(B):
        lengths = [1, 1]  # two one-token documents first, then random lengths
        while sum(lengths) < N:
            lengths.append(int(torch.randint(1, max(2, N // 3), (1,), generator=g)))
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:N])
    return torch.stack(rows)


def module_for(case: dict):
    fields = dict(case.get("fields", {}))
    if case.get("variant", "standard") != "block_sparse":  # block_sparse tiles by block_size
        fields.setdefault("compute_block_size", 16)
    return create_ring_attention(case.get("variant", "standard"), **fields)


def reference_for(attn, case, q, k, v, grad):
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    cfg = attn.config
    kwargs = {}
    if hasattr(attn, "block_mask"):
        kwargs = dict(block_mask=attn.block_mask(case["N"]), block_size=cfg.block_size)
    if cfg.grid_shape is not None:
        kwargs = dict(grid_shape=cfg.grid_shape, grid_window=cfg.grid_window)
    out, lse = reference_attention(qr, kr, vr, case["causal"], cfg.segment_lengths, cfg.dilation_rates,
                                   cfg.scale, document_ids=document_ids_for(case), **kwargs)
    dq, dk, dv = torch.autograd.grad(out, (qr, kr, vr), grad.double())
    return out, lse, dq, dk, dv


def run_split(rank: int, world: int, case: dict) -> dict:
    """Each rank passes its own shard (already_split=True): relative errors on its positions.

    The group and layout are the active sequence sharding's if one is entered around the
    call (the hybrid tests do), else the default group's with the case's layout.
    """
    attn = module_for(case)
    q, k, v, grad = make_inputs(case)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_for(attn, case, q, k, v, grad)
    layout = case.get("fields", {}).get("layout", "auto")
    layout = "contiguous" if layout == "auto" else layout
    shard = lambda x: shard_sequence(x, world, rank, layout).contiguous()
    ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
    ids = document_ids_for(case)
    ids = None if ids is None else shard(ids)
    out, lse = attn(ql, kl, vl, is_causal=case["causal"], already_split=True, return_lse=True,
                    document_ids=ids)
    dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), shard(grad))
    return {"out": rel(out, shard(ref_out)), "lse": rel(lse, shard(ref_lse)),
            "dq": rel(dq, shard(ref_dq)), "dk": rel(dk, shard(ref_dk)), "dv": rel(dv, shard(ref_dv)),
            "stats": attn.get_profiling_stats()}


def run_case(rank: int, world: int, case: dict) -> dict:
    if case["split"]:
        return run_split(rank, world, case)
    attn = module_for(case)
    q, k, v, grad = make_inputs(case)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_for(attn, case, q, k, v, grad)
    qf, kf, vf = (x.clone().requires_grad_() for x in (q, k, v))
    out, lse = attn(qf, kf, vf, is_causal=case["causal"], already_split=False, return_lse=True,
                    document_ids=document_ids_for(case))
    dq, dk, dv = torch.autograd.grad(out, (qf, kf, vf), grad)
    if dist.is_initialized():  # each rank holds its own positions' gradient: the sum is the full one
        for t in (dq, dk, dv):
            dist.all_reduce(t)
    return {"out": rel(out, ref_out), "lse": rel(lse, ref_lse), "dq": rel(dq, ref_dq),
            "dk": rel(dk, ref_dk), "dv": rel(dv, ref_dv), "stats": attn.get_profiling_stats()}


def run_cases(rank: int, world: int, cases: list) -> dict:
    results = {}
    for case in cases:
        try:
            results[case["id"]] = run_case(rank, world, case)
        except Exception as exc:  # reported per case so one failure does not hide the others
            import traceback
            results[case["id"]] = {"error": traceback.format_exc()}
    return results


class _SumGradsOverRanks(torch.autograd.Function):
    """Identity whose backward sums the gradient over ranks (each rank holds its positions)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g)
        return g


def gradcheck_two_ranks(rank: int, world: int, dropout: float = 0.0, documents: bool = False) -> bool:
    """torch.autograd.gradcheck through the ring on 2 ranks (float64, causal, dilated, GQA).

    Every rank passes the SAME full inputs (already_split=False) and gradcheck perturbs the
    same element on every rank at once, so inputs stay identical across ranks and the
    numerical Jacobian is the true one; the analytic one sums each rank's share.
    """
    attn = create_ring_attention("standard", segment_lengths=[4, 16], dilation_rates=[1, 2],
                                 compute_block_size=4, dropout=dropout)
    g = torch.Generator().manual_seed(0)
    B, N, H, K, D = 1, 16, 2, 1, 3
    q = torch.randn(B, N, H, D, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, N, K, D, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, N, K, D, generator=g, dtype=torch.float64, requires_grad=True)

    # documents crossing the rank boundary (at 8), and a one-token document
    ids = torch.tensor([[0] * 3 + [1] + [2] * 6 + [3] * 6]) if documents else None

    def fn(q, k, v):
        torch.manual_seed(rank)  # dropout seeds: fixed per call (gradcheck calls many times)
        q, k, v = (_SumGradsOverRanks.apply(x) for x in (q, k, v))
        return attn(q, k, v, is_causal=True, already_split=False, document_ids=ids)

    return bool(torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4))


def mismatched_lengths(rank: int, world: int):
    attn = create_ring_attention("standard", comm_timeout_s=20)
    T = 8 if rank == 0 else 12
    q = torch.randn(1, T, 2, 4)
    try:
        attn(q, q, q, already_split=True)
    except ValueError as exc:
        return str(exc)
    return None


def silent_peer(rank: int, world: int, variant: str = "distributed", sharding=contextlib.nullcontext):
    """Rank 1 never calls attention; rank 0 must raise within the timeout, not hang.
    ``sharding()``: the context rank 0 calls in (the hybrid tests' all-to-all)."""
    if rank == 1:
        time.sleep(8)
        return "idle"
    attn = create_ring_attention(variant, comm_timeout_s=2.0)
    q = torch.randn(1, 8, 2, 4)
    t0 = time.monotonic()
    try:
        with sharding():
            attn(q, q, q, already_split=True)
    except Exception as exc:
        return (type(exc).__name__, str(exc), time.monotonic() - t0)
    return None


def comm_volumes(rank: int, world: int):
    """Bytes sent for dense vs one spanning segment with dilation 4 (non-causal, no GQA)."""
    vols = []
    q = torch.randn(1, 32, 4, 8)
    for fields in ({}, {"segment_lengths": [64], "dilation_rates": [4]}):
        attn = create_ring_attention("standard", **fields)
        attn(q, q, q, already_split=True)
        vols.append(attn.get_profiling_stats()["comm_volume_mb"])
    return vols


def mixed_precision_errors(rank: int, world: int) -> dict:
    """distributed variant, bf16 blocks + float32 merge: max relative error over ranks' shards."""
    case = dict(B=1, N=256, H=4, K=2, D=16, seed=5)
    errors = {}
    for causal in (False, True):
        attn = create_ring_attention("distributed", enable_mixed_precision=True, attention_dtype="bfloat16",
                                     segment_lengths=[64, 256], dilation_rates=[1, 2], layout="contiguous")
        q, k, v, grad = make_inputs(case)
        ref_out, _, ref_dq, ref_dk, ref_dv = reference_for(attn, dict(case, causal=causal), q, k, v, grad)
        shard = lambda x: shard_sequence(x, world, rank, "contiguous").contiguous()
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        out = attn(ql, kl, vl, is_causal=causal, already_split=True)
        dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), shard(grad))
        errors[causal] = max(rel(out, shard(ref_out)), rel(dq, shard(ref_dq)), rel(dk, shard(ref_dk)),
                             rel(dv, shard(ref_dv)))
    return errors


def custom_order_matches_default(rank: int, world: int) -> float:
    """custom_ring_order visits partners in another order; results must not change."""
    case = dict(B=1, N=64, H=4, K=2, D=8, seed=9)
    q, k, v, grad = make_inputs(case)
    shard = lambda x: shard_sequence(x, world, rank, "zigzag").contiguous()
    outs = []
    for order in (None, [0, 2, 1, 3]):
        attn = create_ring_attention("standard", layout="zigzag", custom_ring_order=order)
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        out = attn(ql, kl, vl, is_causal=True, already_split=True)
        outs.append([out, *torch.autograd.grad(out, (ql, kl, vl), shard(grad))])
    return max(rel(a, b) for a, b in zip(*outs))


def sync_comm_matches_async(rank: int, world: int) -> float:
    """async_ring_communication=False posts each transfer only when needed: same numbers."""
    case = dict(B=1, N=48, H=2, K=1, D=4, seed=11)
    q, k, v, grad = make_inputs(case)
    shard = lambda x: shard_sequence(x, world, rank, "contiguous").contiguous()
    outs = []
    for flag in (True, False):
        attn = create_ring_attention("standard", async_ring_communication=flag, segment_lengths=[16, 48],
                                     dilation_rates=[1, 2])
        ql, kl, vl = (shard(x).requires_grad_() for x in (q, k, v))
        out = attn(ql, kl, vl, is_causal=False, already_split=True)
        outs.append([out, *torch.autograd.grad(out, (ql, kl, vl), shard(grad))])
    return max(rel(a, b) for a, b in zip(*outs))


def full_sequence_after_strategy_sharding(rank: int, world: int) -> str:
    """Inside an active sequence sharding (the strategy shards) full sequences are refused."""
    attn = create_ring_attention("standard")
    q = torch.randn(1, 8, 2, 4)
    try:
        with sequence_sharding(dist.group.WORLD, "contiguous"):
            attn(q, q, q, already_split=False)
    except ValueError as exc:
        return str(exc)
    return ""


def nonfinite_gradient_on_one_rank(rank: int, world: int) -> str:
    """validate_gradients: a NaN on rank 0 only makes EVERY rank of the group raise."""
    attn = create_ring_attention("distributed", validate_gradients=True, comm_timeout_s=20)
    q = torch.randn(1, 8, 2, 4, requires_grad=True)
    out = attn(q, q, q, already_split=True)
    grad = torch.ones_like(out)
    if rank == 0:
        grad[0, 0, 0, 0] = float("nan")
    try:
        out.backward(grad)
    except FloatingPointError as exc:
        return str(exc)
    return ""
