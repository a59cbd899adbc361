"""Per-rank code for test_compression.py (imported by spawned processes).

The model is one weight matrix, so a DDP bucket is exactly ``W.grad.flatten()`` and the
test can replay each hook's arithmetic entry by entry.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ring_lightning.parallel.compression import register_compression_hook

OUT_FEATURES, IN_FEATURES = 8, 16
NUM_STEPS = 4


def _inputs(method: str, rank: int, step: int):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    if method == "powersgd":
        # Same input row on every rank, different targets: every rank's gradient, and their
        # sum, is (something) x^T, rank 1, so rank-1 PowerSGD must be exact.
        x = torch.randn(1, IN_FEATURES, generator=torch.Generator().manual_seed(step))
        y = torch.randn(1, OUT_FEATURES, generator=gen)
    else:
        x = torch.randn(3, IN_FEATURES, generator=gen)
        y = torch.randn(3, OUT_FEATURES, generator=gen)
    return x, y


def run_hook(rank: int, world_size: int, method: str, ratio: float, error_feedback: bool) -> Dict[str, List]:
    """Train-free backward passes under the hook; return what DDP produced and each rank's local grad.

    Returns:
        ``got``: per step, the hook's averaged gradient (flat); ``local``: per step, every
        rank's own gradient (flat, all-gathered); ``ratio``: per step, ``stats.ratio``;
        ``residual``: the final error-feedback memory of the weight (sparse hooks).
    """
    torch.manual_seed(0)
    model = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
    ddp = DistributedDataParallel(model)
    state = register_compression_hook(ddp, method, ratio=ratio, rank=1, error_feedback=error_feedback)
    out: Dict[str, List] = {"got": [], "local": [], "ratio": []}
    for step in range(NUM_STEPS):
        x, y = _inputs(method, rank, step)
        # The local gradient, without DDP: the same parameters, the same loss.
        w = model.weight.detach().clone().requires_grad_(True)
        (x @ w.T - y).pow(2).sum().backward()
        local = w.grad.flatten()
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local)

        ddp.zero_grad(set_to_none=True)
        (ddp(x) - y).pow(2).sum().backward()
        out["got"].append(model.weight.grad.flatten().clone())
        out["local"].append(torch.stack(gathered))
        out["ratio"].append(1.0 if state is None else state.stats.ratio)
    residuals = getattr(state, "residuals", {})  # by parameter name
    out["residual"] = [residuals["weight"].clone()] if "weight" in residuals else []
    return out


def run_cases(rank: int, world_size: int, cases: List[tuple]) -> Dict[tuple, Dict[str, List]]:
    """``run_hook`` for each ``(method, ratio, error_feedback)``: one spawn for all of them."""
    return {case: run_hook(rank, world_size, *case) for case in cases}


def run_resumed(rank: int, world_size: int, method: str) -> Dict[str, List]:
    """Two parameters, 4 backward passes under ``method``: once straight through (one DDP
    bucket), once as 2 passes, ``state_dict()``, a NEW DDP with one bucket per parameter and
    the state loaded, 2 more passes. Returns the averaged gradients of both, per step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False), nn.Linear(OUT_FEATURES, 4, bias=False))

    def passes(ddp, state, steps):
        grads = []
        for step in steps:
            x, y = _inputs(method, rank, step)
            ddp.zero_grad(set_to_none=True)
            (ddp(x) - y[:, :4]).pow(2).sum().backward()
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
        return grads

    ddp = DistributedDataParallel(model)
    state = register_compression_hook(ddp, method, ratio=0.25)
    straight = passes(ddp, state, range(4))

    ddp = DistributedDataParallel(model)
    state = register_compression_hook(ddp, method, ratio=0.25)
    first = passes(ddp, state, range(2))
    saved = state.state_dict()
    ddp = DistributedDataParallel(model, bucket_cap_mb=1e-6)  # one bucket per parameter now
    state = register_compression_hook(ddp, method, ratio=0.25)
    state.load_state_dict(saved)
    return {"straight": straight, "resumed": first + passes(ddp, state, range(2, 4))}
