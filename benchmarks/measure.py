"""Measure one row: validate its first call, time its repeats, record its memory.

Timing: the first call is timed on the host (it also validates and sizes the repeats),
then warm-up, then each repeat between CUDA events on every rank; reported ms = max over
ranks of the per-rank median. Peak memory = ``torch.cuda.max_memory_allocated`` per rank
during the row (``peak``) and what the row added to what was allocated before it
(``+mem``: its inputs, outputs, gradients and workspace). Every decision that changes
what a rank does next goes through ``Dist.agree_max`` (see ``_common.py``).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Dict, List, Optional

from _common import Dist, rel_err, short_error
from runners import Runner, open_runner
from specs import Spec

import torch

VALID_TOL = 2e-2  # relative error of bf16 rows against the float32 reference
def _time_repeats(runner: Runner, d: Dist, reps: int) -> List[float]:
    """Milliseconds of each of ``reps`` steps: CUDA events on GPU, the host clock on CPU."""
    if d.device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in ev:
            s.record()
            runner.step()
            e.record()
        torch.cuda.synchronize(d.device)
        return [s.elapsed_time(e) for s, e in ev]
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        runner.step()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def run_row(runner: Runner, d: Dist, args, ref: Optional[List[torch.Tensor]]) -> Dict[str, Any]:
    """First call (validated against ``ref`` when given), warm-up, timed repeats."""
    rec: Dict[str, Any] = {}
    cuda = d.device.type == "cuda"
    d.barrier()
    t0 = time.perf_counter()
    res = runner.step()
    d.sync()
    first_s = d.agree_max([time.perf_counter() - t0])[0]
    rec["first_call_s"] = round(first_s, 4)
    if ref is not None:
        got = runner.to_check(res)
        errs = d.agree_max([rel_err(x, runner.ref_view(r)) for x, r in zip(got, ref)])
        rec["validation"] = dict(zip(("out", "dq", "dk", "dv"), errs))
        rec["valid"] = bool(max(errs) < VALID_TOL)
        del got
    del res
    refused = runner.refusals()  # the row's own module: refusals are per module (kernel_policy.py)
    if refused:
        rec["kernels_refused"] = refused
    # the first call sizes the run: at most --row-cap-s of timing, no warm-up for slow rows
    reps = max(1, min(args.repeats, int(args.row_cap_s / max(first_s, 1e-6))))
    warm = max(0, args.warmup - 1) if first_s < 1.0 else 0
    for _ in range(warm):
        runner.step()
    d.sync()
    d.barrier()
    times = _time_repeats(runner, d, reps)
    med = statistics.median(times)
    per_rank = d.gather_objects(dict(median=med, min=min(times), max=max(times),
                                     peak=torch.cuda.max_memory_allocated(d.device) if cuda else None))
    rec.update(repeats=reps, warmup=1 + warm, ms=max(p["median"] for p in per_rank),
               ms_min=min(p["min"] for p in per_rank), ms_per_rank=[round(p["median"], 3) for p in per_rank],
               spread_pct=round(100 * (max(times) - min(times)) / med, 1) if med > 0 else None)
    if cuda:
        rec["peak_gib_per_rank"] = [round(p["peak"] / 2**30, 3) for p in per_rank]
    try:
        st = runner.stats()
        if st:
            rec["ring_stats_last_call"] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in st.items()}
    except Exception as exc:  # noqa: BLE001
        rec["ring_stats_error"] = short_error(exc)
    return rec


def execute_row(spec: Spec, base, d: Dist, args, n: int, causal: bool, ref) -> Dict[str, Any]:
    """Build, validate and time one row; its tensors are freed when this returns."""
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
        torch.cuda.reset_peak_memory_stats(d.device)
        before = torch.cuda.memory_allocated(d.device)
    with open_runner(spec, base, d, args, n, causal) as runner:
        rec = run_row(runner, d, args, ref)
        rec["notes"] = runner.notes
    del runner
    if d.device.type == "cuda":
        added = torch.cuda.max_memory_allocated(d.device) - before
        rec["added_gib_per_rank"] = [round(x / 2**30, 3) for x in d.gather_objects(added)]
    return rec
