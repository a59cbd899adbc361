"""Block-sparse density sweep and the four variants side by side, on 2 GPUs (one run).

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_variants.py     # GPUs, NCCL
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/bench_variants.py --dry-run

Causal bf16 self-attention, B=1 H=32 D=128, forward + backward, already_split=True with
each module's preferred layout. Rows: ``block_sparse`` at several kept-block ratios (two
patterns) against ``standard`` dense at the same N, to show time falling with density;
then ``standard``, ``distributed``, ``hilbert``, ``block_sparse`` at one N. ms = median of
CUDA-event timings per rank, max over ranks. Writes $OUT/bench_variants.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from _common import Dist, env_info, import_engine, short_error, write_table

attention, sharding = import_engine()


def time_fwd_bwd(attn, q, k, v, grad, repeats: int, device) -> float:
    def step():
        out = attn(q, k, v, is_causal=True, already_split=True)
        torch.autograd.grad(out, (q, k, v), grad)
    step()  # warm-up (kernel selection, plan, masks)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); step(); b.record(); b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter(); step(); times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget-s", type=float, default=200)
    args = ap.parse_args()
    d = Dist(args.dry_run, timeout_s=300)
    dev, dtype = d.device, (torch.float32 if args.dry_run else torch.bfloat16)
    H, D = (4, 16) if args.dry_run else (32, 128)
    sweep_n = [256] if args.dry_run else [32768, 131072]
    ratios = (0.05, 0.1, 0.25, 0.5) if not args.dry_run else (0.25, 0.5)
    bs = 16 if args.dry_run else 128
    reps = 2 if args.dry_run else 5
    rows, t_start = [], time.monotonic()
    world, rank = d.world, d.rank

    def run(name, n, variant, **fields):
        if time.monotonic() - t_start > args.budget_s:
            rows.append(dict(name=name, n=n, variant=variant, error="skipped: time budget"))
            return
        g = torch.Generator(device="cpu").manual_seed(0)
        T = n // world
        mk = lambda: torch.randn(1, T, H, D, generator=g).to(dev, dtype).requires_grad_()
        q, k, v = mk(), mk(), mk()
        grad = torch.randn(1, T, H, D, generator=g).to(dev, dtype)
        error, ms = None, float("nan")
        try:
            attn = attention.create_ring_attention(variant, **fields)
            group = dist.group.WORLD if world > 1 else None
            with sharding.sequence_sharding(group, attn.preferred_layout(n, world, True)):
                ms = time_fwd_bwd(attn, q, k, v, grad, reps, dev)
        except Exception as exc:  # noqa: BLE001 - record and go on
            error = short_error(exc)
        ms = d.agree_max([ms])[0]  # every rank reaches this, failed or not: no rank waits alone
        if error or ms == float("inf"):
            row = dict(name=name, n=n, variant=variant, error=error or "failed on another rank")
        else:
            st = attn.get_profiling_stats()
            row = dict(name=name, n=n, variant=variant, ms=ms, **fields,
                       computed_tiles=st.get("computed_tiles"), comm_mb=st["comm_volume_mb"])
            if variant == "block_sparse":
                row["kept_fraction"] = float(attn.block_mask(n).float().mean())
        rows.append(row)
        d.log(f"{name:28s} N={n:7d} {row.get('ms', row.get('error'))}")
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    for n in sweep_n:
        run("dense standard", n, "standard")
        for pattern in ("local_window", "random"):
            for r in ratios:
                run(f"block_sparse {pattern} {r}", n, "block_sparse", block_size=bs, sparsity_ratio=r,
                    sparse_pattern=pattern)
    n = sweep_n[0]
    for variant in ("standard", "distributed", "hilbert", "block_sparse"):
        run(f"variant {variant}", n, variant)
    if d.is_main:
        dense = {r["n"]: r["ms"] for r in rows if r["name"] == "dense standard" and "ms" in r}
        lines = [f"# Variants and block-sparse density: {env_info(dev).get('device_name', dev.type)} x{world}, "
                 f"causal {dtype}, B=1 H={H} D={D}, fwd+bwd", "",
                 "| row | N | kept fraction | ms | time / dense standard | computed tiles | comm MB |",
                 "|---|---|---|---|---|---|---|"]
        for r in rows:
            ratio = f"{r['ms'] / dense[r['n']]:.3f}" if "ms" in r and r["n"] in dense else "-"
            lines.append(f"| {r['name']} | {r['n']} | {r.get('kept_fraction', '-') if r.get('kept_fraction') is None else round(r['kept_fraction'], 3)} | "
                         f"{round(r['ms'], 2) if 'ms' in r else r.get('error')} | {ratio} | "
                         f"{r.get('computed_tiles', '-')} | {round(r['comm_mb'], 1) if 'comm_mb' in r else '-'} |")
        write_table("bench_variants", "\n".join(lines), dev, rows)
    d.close()


if __name__ == "__main__":
    main()
