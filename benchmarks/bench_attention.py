"""Attention benchmark: ring_lightning vs PyTorch context parallel vs single-GPU SDPA, one run.

Run (from the repository root):

    torchrun --standalone --nproc_per_node=2 benchmarks/bench_attention.py        # 2 GPUs
    python benchmarks/bench_attention.py                                          # 1 GPU: 1-GPU rows only
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 \\
        benchmarks/bench_attention.py --dry-run                                    # CPU smoke test

Workload: causal self-attention, bf16, B=1, H=32, D=128 (flags change them), forward +
backward (``torch.autograd.grad`` of the output against a fixed random output gradient),
for several total sequence lengths N, with a dense pattern and a LongNet-dilated one.

Rows (``impl``):
  sdpa-cudnn / sdpa-flash   F.scaled_dot_product_attention on the FULL sequence, one GPU,
                            backend forced with ``sdpa_kernel`` (every rank runs it at once
                            on its own GPU; the slowest rank's time is reported).
  cp-cudnn / cp-flash       ``torch.distributed.tensor.experimental.context_parallel`` over
                            all ranks (head-tail load balancing for causal, rotate method
                            ``--cp-rotate``), the same two SDPA backends.
  rl-<variant>[-<kernel>]   ring_lightning ``create_ring_attention(variant, kernel=...)`` over
                            all ranks, ``already_split=True`` with the module's preferred layout
                            (zigzag when a causal pattern spans ranks).
  rl-standard-1gpu          ring_lightning with no process group on the full sequence (one
                            GPU); the 1-GPU peer of the dilated rows, which SDPA cannot do.

FLOPs (the same definition for every row): fwd = 4 * B * D * P, bwd = 2.5 * fwd, where P
is the number of (query, key) pairs the pattern allows, summed over heads, counted by
``ring_lightning.models.flops.attention_pairs`` (causal: m^2 / 2 for m mutually visible tokens;
dense causal P = H * N^2 / 2; dilated and block-sparse: the pairs of the pattern).
TFLOP/s per GPU = (fwd + bwd) FLOPs / #GPUs of the row / time.

Timing and memory: see ``measure.py``. Files: ``specs.py`` (row names -> what runs, and
its pairs), ``runners.py`` (the implementations and references), ``measure.py`` (one
row), ``report.py`` (ratios, log lines, tables), this file (flags and the loop).

Validation (at the smallest N, or every N with --validate-all) before timing: every row's
output and q/k/v gradients against a float32 reference from the same bf16 inputs (dense:
SDPA memory-efficient kernel in float32; dilated: ring_lightning on one device in float32,
portable kernel); relative error ||x - ref|| / ||ref|| must be < 2e-2.

Every row runs in try/except: an OOM or an unsupported backend is recorded and the run goes
on. Results: ``$OUT/bench_attention.json`` (everything), ``$OUT/bench_attention.md`` (table).
"""

from __future__ import annotations

import argparse
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

from _common import Clock, Dist, env_info, import_engine, out_dir, short_error, write_json
from measure import execute_row
from report import FLOPS_NOTE, add_ratios, log_line, markdown
from runners import dense_reference, dilated_reference
from specs import DEFAULT_IMPLS, Spec, make_specs, row_pairs

import torch

attention, flops = import_engine("attention", "models.flops")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU + gloo, float32, tiny sizes")
    ap.add_argument("--seqs", default=None, help="total sequence lengths (default 16384,32768,65536,131072)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=None, help="query heads (default 32; dry run 4)")
    ap.add_argument("--kv-heads", type=int, default=None, help="kv heads (default = heads)")
    ap.add_argument("--dim", type=int, default=None, help="head dim (default 128; dry run 16)")
    ap.add_argument("--non-causal", action="store_true", help="benchmark non-causal attention instead")
    ap.add_argument("--dilated-segments", default=None,
                    help="segment lengths, 'N' = the whole sequence (default 8192,32768,N; dry run 64,128,N)")
    ap.add_argument("--dilated-rates", default="1,2,4")
    ap.add_argument("--no-dilated", action="store_true")
    ap.add_argument("--impls", default=",".join(DEFAULT_IMPLS), help=f"rows to run, from {DEFAULT_IMPLS}")
    ap.add_argument("--cp-rotate", default="allgather", choices=("allgather", "alltoall"))
    ap.add_argument("--block-size", type=int, default=None, help="block_sparse block size (default 128; dry 16)")
    ap.add_argument("--sparsity-ratio", type=float, default=0.1, help="block_sparse fraction of blocks kept")
    ap.add_argument("--block-sparse-max-n", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--row-cap-s", type=float, default=6.0, help="timed seconds per row at most (fewer repeats)")
    ap.add_argument("--max-iter-s", type=float, default=12.0,
                    help="skip a row whose predicted fwd+bwd (from its time at the previous N) exceeds this")
    ap.add_argument("--budget-s", type=float, default=300.0, help="stop starting rows after this many seconds")
    ap.add_argument("--validate-all", action="store_true", help="validate at every N, not only the smallest")
    ap.add_argument("--ref-tile", type=int, default=2048, help="tile of the dilated float32 reference")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="process-group timeout (hang guard)")
    args = ap.parse_args()
    dry = args.dry_run
    args.seqs = [int(s) for s in (args.seqs or ("256,512" if dry else "16384,32768,65536,131072")).split(",")]
    args.heads = args.heads or (4 if dry else 32)
    args.kv_heads = args.kv_heads or args.heads
    args.dim = args.dim or (16 if dry else 128)
    args.dilated_segments = [s.strip() for s in (args.dilated_segments or ("64,128,N" if dry else "8192,32768,N")).split(",")]
    args.dilated_rates = [int(r) for r in args.dilated_rates.split(",")]
    if len(args.dilated_rates) != len(args.dilated_segments):
        ap.error("--dilated-segments and --dilated-rates need the same number of entries")
    args.block_size = args.block_size or (16 if dry else 128)
    if dry:
        args.ref_tile = min(args.ref_tile, 64)
        args.block_sparse_max_n = max(args.block_sparse_max_n, max(args.seqs))
    args.impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    return args


def rejected_variants(specs: List[Spec], d: Dist) -> Dict[str, str]:
    """Ring variants ``create_ring_attention`` refuses (by name), with the reason."""
    out: Dict[str, str] = {}
    for v in sorted({s.variant for s in specs if s.is_ring}):
        try:
            attention.create_ring_attention(v)
        except (ValueError, TypeError) as exc:
            out[v] = short_error(exc)
            d.log(f"skip variant {v!r}: {out[v]}")
    return out


def make_inputs(n: int, args, d: Dist, dtype: torch.dtype) -> List[torch.Tensor]:
    """q, k, v, dout in (B, N, heads, D), identical on every rank whatever the RNG does."""
    B, H, K, D = args.batch, args.heads, args.kv_heads, args.dim
    gen = torch.Generator(device=d.device).manual_seed(1234 + n)
    base = [torch.randn(B, n, h, D, generator=gen, device=d.device, dtype=torch.float32).to(dtype)
            for h in (H, K, K, H)]
    if d.launched and d.world > 1:
        for t in base:
            torch.distributed.broadcast(t, src=0)
    return base


def skip_reason(spec: Spec, n: int, d: Dist, args, rejected: Dict[str, str], clock: Clock,
                last_ms: Dict[Tuple[str, str], Tuple[int, float]], rec: Dict[str, Any]) -> Optional[str]:
    """Why this rank would not run the row (None: run it); sets ``rec['predicted_s']``."""
    if spec.is_ring and spec.variant in rejected:
        return f"variant rejected: {rejected[spec.variant]}"
    if spec.impl == "cp" and (d.world < 2 or d.device.type != "cuda"):
        return "needs >= 2 CUDA ranks (torch context parallel)"
    if spec.impl == "ring" and d.world < 2:
        return "needs >= 2 ranks (see rl-standard-1gpu)"
    if spec.variant == "block_sparse" and n > args.block_sparse_max_n:
        return f"N > --block-sparse-max-n {args.block_sparse_max_n}"
    # attention time grows as N^2: predict this N from the row's time at the previous one
    prev = last_ms.get((spec.key, spec.pattern))
    predicted = prev[1] / 1e3 * (n / prev[0]) ** 2 if prev else None
    rec["predicted_s"] = predicted
    if predicted is not None and predicted > args.max_iter_s:
        return f"predicted {predicted:.3g} s per fwd+bwd (> --max-iter-s {args.max_iter_s:g})"
    if clock.left() < (3 * predicted if predicted else 0) + 5:
        return f"time budget ({args.budget_s:g} s) spent"
    return None


def reference_for(spec: Spec, refs: Dict[str, Any], base, causal: bool, args, n: int, d: Dist):
    """(reference tensors or None, its description), computed once per pattern and N."""
    if spec.pattern not in refs:
        try:
            if spec.pattern == "dense":
                refs[spec.pattern] = dense_reference(base, causal, d.device)
            else:
                refs[spec.pattern] = dilated_reference(base, causal, args, n, d.device)
        except Exception as exc:  # noqa: BLE001
            refs[spec.pattern] = (None, f"reference failed: {short_error(exc)}")
            d.log(f"[warn] {spec.pattern} reference failed: {short_error(exc)}")
    if spec.variant == "block_sparse" and spec.is_ring:
        return None, "none (block mask differs from dense)"
    return refs[spec.pattern]


def main() -> int:
    args = parse_args()
    d = Dist(args.dry_run, args.timeout_s)
    if not args.dry_run and not d.cuda:
        print("bench_attention.py needs CUDA; use --dry-run on a CPU machine", flush=True)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 references stay float32
    torch.backends.cudnn.allow_tf32 = False
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    causal = not args.non_causal
    clock = Clock(args.budget_s)
    info = env_info(d.device)
    info.update(world=d.world, backend=d.backend, dry_run=args.dry_run, dtype=str(dtype).replace("torch.", ""),
                causal=causal, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim,
                seqs=args.seqs, dilated_segments=args.dilated_segments, dilated_rates=args.dilated_rates,
                cp_rotate=args.cp_rotate, flops=FLOPS_NOTE)
    d.log(f"bench_attention: {info.get('device_name')} x{d.world} ({d.backend}), torch {info['torch']}, "
          f"cuda {info.get('cuda')}, cudnn {info.get('cudnn')}; {info['dtype']} causal={causal} B={args.batch} "
          f"H={args.heads} K={args.kv_heads} D={args.dim} N={args.seqs}")

    specs = make_specs(args.impls, not args.no_dilated)
    rejected = rejected_variants(specs, d)
    records: List[Dict[str, Any]] = []
    last_ms: Dict[Tuple[str, str], Tuple[int, float]] = {}
    n_tracebacks = 0

    def save(final: bool = False):
        if d.is_main:
            write_json(out_dir() / "bench_attention.json",
                       dict(info=info, skipped_variants=rejected, rows=records, complete=final,
                            elapsed_s=round(clock.elapsed(), 1)))

    for n in args.seqs:
        B, H, K, D = args.batch, args.heads, args.kv_heads, args.dim
        base = make_inputs(n, args, d, dtype)
        validate = args.validate_all or n == args.seqs[0]
        refs: Dict[str, Any] = {}
        for spec in specs:
            gpus = spec.gpus(d.world)
            rec: Dict[str, Any] = dict(N=n, key=spec.key, impl=spec.impl, pattern=spec.pattern,
                                       kernel=spec.backend, variant=spec.variant if spec.is_ring else None,
                                       gpus=gpus, B=B, H=H, K=K, D=D, causal=causal)
            pairs = row_pairs(spec, args, n, H, causal) if spec.variant not in rejected else 0.0
            rec["flops"] = flops.flops_from_pairs(pairs, D, B)
            rec["density"] = pairs / flops.attention_pairs(n, H, causal=causal)
            why = skip_reason(spec, n, d, args, rejected, clock, last_ms, rec)
            if d.agree_max([1.0 if why else 0.0])[0] > 0:  # all ranks skip, or none
                rec["skipped"] = why or "skipped on another rank"
                records.append(rec)
                d.log(log_line(rec, clock.elapsed()))
                continue

            error = None
            t_row = time.monotonic()
            try:
                ref = None
                if validate:
                    ref, rec["reference"] = reference_for(spec, refs, base, causal, args, n, d)
                rec.update(execute_row(spec, base, d, args, n, causal, ref))
            except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                error = short_error(exc)
                n_tracebacks += 1
                if n_tracebacks <= 4:
                    print(f"[rank {d.rank}] {spec.key} N={n} raised:\n{traceback.format_exc()}", flush=True)
            if d.device.type == "cuda":
                try:
                    torch.cuda.synchronize(d.device)
                except Exception:  # noqa: BLE001
                    pass
                torch.cuda.empty_cache()
            if d.agree_max([1.0 if error else 0.0])[0] > 0:
                msgs = [m for m in d.gather_objects(error) if m]
                rec["error"] = msgs[0] if msgs else "raised on another rank"
                for k in ("ms", "ms_min", "ms_per_rank"):
                    rec.pop(k, None)
            else:
                rec["tflops_per_gpu"] = rec["flops"] / gpus / (rec["ms"] / 1e3) / 1e12
                last_ms[(spec.key, spec.pattern)] = (n, rec["ms"])
            rec["row_s"] = round(time.monotonic() - t_row, 2)
            records.append(rec)
            d.log(log_line(rec, clock.elapsed()))
            save()
        del base, refs
        if d.device.type == "cuda":
            torch.cuda.empty_cache()

    add_ratios(records)
    save(final=True)
    if d.is_main:
        md = markdown(records, info, rejected)
        (out_dir() / "bench_attention.md").write_text(md)
        print("\n" + md, flush=True)
        bad = [r for r in records if r.get("valid") is False]
        print(f"bench done in {clock.elapsed():.0f}s; {len(bad)} rows failed validation; files in {out_dir()}",
              flush=True)
    d.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
