"""GPU parity: every ring variant vs the float64 brute-force reference, on 2+ GPUs (NCCL).

Run (from the repository root):

    torchrun --standalone --nproc_per_node=2 tests/gpu/gpu_parity.py          # GPUs, NCCL
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 \\
        tests/gpu/gpu_parity.py --dry-run                                      # CPU, gloo

For each variant that ``create_ring_attention`` accepts (a rejected name is reported as
skipped) and each case of a grid -- dense and three dilation sets (one whose largest
segment spans all ranks, one clamped to the sequence), causal or not, both layouts,
``already_split`` True and False, grouped-query attention, head dims 64 and 128, batch 1
and 2 -- it runs forward + backward in bf16 on the device and compares the output, the
log-sum-exp and the q/k/v gradients with ``reference_attention`` computed on the same
device in float64 from the same (bf16-rounded) inputs:

    rel = ||x - ref|| / ||ref||   (over this rank's positions, then the max over ranks)

A case passes when every rel is <= 2e-2 (bf16) or <= 1e-4 (the float32 cases, TF32 off).
A few single-device cases (group None) check the CUDA kernels without communication.
Writes ``$OUT/gpu_parity.json`` and ``$OUT/gpu_parity.md`` (default ``./bench_out``) and
exits 1 if any case failed or raised.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List

# the torchrun plumbing (process group, agreement between ranks, JSON) is the benchmarks'
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import Dist, env_info, fmt, import_engine, out_dir, rel_err, short_error, write_json  # noqa: E402

import torch  # noqa: E402

attention, sharding = import_engine()
create_ring_attention = attention.create_ring_attention
reference_attention = attention.reference_attention
shard_sequence = sharding.shard_sequence

ALL_VARIANTS = ("standard", "hilbert", "distributed", "block_sparse")
TOL = {"bf16": 2e-2, "float32": 1e-4}
DTYPES = {"bf16": torch.bfloat16, "float32": torch.float32}
SPARSE_PATTERNS = ("local_window", "dilated", "global_local", "random")


def pattern_sets(n: int):
    """(name, segment_lengths, dilation_rates) over a sequence of ``n`` tokens."""
    return [
        ("dense", None, None),
        ("local+span", [n // 8, n // 2], [1, 2]),      # zigzag: n/2 spans the pieces
        ("span-all", [n // 4, n], [1, 4]),             # the largest segment spans all ranks
        ("clamped", [n // 2, n, 4 * n], [2, 4, 8]),    # 4n is clamped to n; offsets up to 7
    ]


def shapes(dry: bool):
    d_small, d_big = (16, 32) if dry else (64, 128)
    return [
        dict(B=1, H=8, K=8, D=d_small),
        dict(B=2, H=8, K=2, D=d_big),     # grouped-query attention, 4 query heads per kv head
        dict(B=1, H=6, K=3, D=d_small),   # head count not a power of two; GQA group 2
    ]


def build_cases(args, variants: List[str]) -> List[dict]:
    n = args.n
    cases: List[dict] = []
    shp = shapes(args.dry_run)
    for variant in variants:
        idx = 0
        for pname, segs, rates in pattern_sets(n):
            for causal in (False, True):
                for layout in ("contiguous", "zigzag"):
                    for split in (True, False):
                        case = dict(variant=variant, pattern=pname, segments=segs, rates=rates,
                                    causal=causal, layout=layout, split=split, N=n, dtype="bf16",
                                    world1=False, seed=1000 + len(cases), **shp[idx % len(shp)])
                        if variant == "block_sparse":
                            case["sparse_pattern"] = SPARSE_PATTERNS[idx % len(SPARSE_PATTERNS)]
                        cases.append(case)
                        idx += 1
        # one float32 case per variant: dilated, causal, GQA, zigzag, full-sequence input
        _, segs, rates = pattern_sets(n)[3]
        cases.append(dict(variant=variant, pattern="clamped", segments=segs, rates=rates, causal=True,
                          layout="zigzag", split=False, N=n, dtype="float32", world1=False,
                          seed=1000 + len(cases), B=2, H=8, K=2, D=shp[0]["D"],
                          **({"sparse_pattern": "random"} if variant == "block_sparse" else {})))
    if "standard" in variants:
        # single device (group None): the CUDA block kernels without communication
        for pname, segs, rates in pattern_sets(n):
            for causal in (False, True):
                cases.append(dict(variant="standard", pattern=pname, segments=segs, rates=rates,
                                  causal=causal, layout="contiguous", split=True, N=n, dtype="bf16",
                                  world1=True, seed=1000 + len(cases), **shp[len(cases) % len(shp)]))
        # a longer sequence, dense causal zigzag and a spanning dilated set
        n2 = 2 * n
        cases.append(dict(variant="standard", pattern="dense", segments=None, rates=None, causal=True,
                          layout="zigzag", split=True, N=n2, dtype="bf16", world1=False,
                          seed=1000 + len(cases), B=1, H=4, K=4, D=shp[1]["D"]))
        _, segs, rates = pattern_sets(n2)[2]
        cases.append(dict(variant="standard", pattern="span-all", segments=segs, rates=rates, causal=True,
                          layout="contiguous", split=False, N=n2, dtype="bf16", world1=False,
                          seed=1000 + len(cases), B=1, H=8, K=2, D=shp[0]["D"]))
    return cases


def module_fields(case: dict, dry: bool) -> Dict[str, Any]:
    fields: Dict[str, Any] = dict(segment_lengths=case["segments"], dilation_rates=case["rates"],
                                  layout=case["layout"])
    if dry:
        fields["compute_block_size"] = 16  # exercise the tiling of the portable kernel
    if case["variant"] == "block_sparse":
        fields.update(block_size=8 if dry else 64, sparsity_ratio=0.3, sparse_pattern=case["sparse_pattern"])
    return fields


def make_inputs(case: dict, device, dtype):
    g = torch.Generator().manual_seed(case["seed"])
    B, N, H, K, D = case["B"], case["N"], case["H"], case["K"], case["D"]
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    return mk(B, N, H, D), mk(B, N, K, D), mk(B, N, K, D), mk(B, N, H, D)


def run_case(case: dict, d: Dist, dry: bool) -> Dict[str, float]:
    """This rank's relative errors for one case."""
    dtype = DTYPES[case["dtype"]]
    attn = create_ring_attention(case["variant"], **module_fields(case, dry))
    if case["world1"]:
        attn.set_process_group(None)
    q, k, v, g = make_inputs(case, d.device, dtype)

    # reference: float64 on the same device, from the same rounded inputs
    qr, kr, vr = (x.to(torch.float64).requires_grad_() for x in (q, k, v))
    cfg = attn.config
    extra = {}
    if hasattr(attn, "block_mask"):
        extra = dict(block_mask=attn.block_mask(case["N"]), block_size=cfg.block_size)
    ref_out, ref_lse = reference_attention(qr, kr, vr, case["causal"], cfg.segment_lengths,
                                           cfg.dilation_rates, cfg.scale, **extra)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref_out, (qr, kr, vr), g.to(torch.float64))
    ref_out, ref_lse = ref_out.detach(), ref_lse.detach()

    world = 1 if case["world1"] or d.world == 1 else d.world
    if case["split"] or world == 1:
        if world == 1:
            shard = lambda x: x
        else:
            shard = lambda x: shard_sequence(x, world, d.rank, case["layout"]).contiguous()
        ql, kl, vl = (shard(x).detach().clone().requires_grad_() for x in (q, k, v))
        out, lse = attn(ql, kl, vl, is_causal=case["causal"], already_split=True, return_lse=True)
        dq, dk, dv = torch.autograd.grad(out, (ql, kl, vl), shard(g))
        refs = [shard(x) for x in (ref_out, ref_lse, ref_dq, ref_dk, ref_dv)]
    else:
        qf, kf, vf = (x.detach().clone().requires_grad_() for x in (q, k, v))
        out, lse = attn(qf, kf, vf, is_causal=case["causal"], already_split=False, return_lse=True)
        dq, dk, dv = torch.autograd.grad(out, (qf, kf, vf), g)
        # each rank holds the gradient of its own positions (zeros elsewhere): sum = full gradient
        dq, dk, dv = (t.to(torch.float32) for t in (dq, dk, dv))
        for t in (dq, dk, dv):
            torch.distributed.all_reduce(t)
        refs = [ref_out, ref_lse, ref_dq, ref_dk, ref_dv]
    errs = {name: rel_err(x, r) for name, x, r in zip(("out", "lse", "dq", "dk", "dv"),
                                                       (out, lse, dq, dk, dv), refs)}
    return errs


def describe(case: dict) -> str:
    segs = "-" if case["segments"] is None else f"{case['segments']}/{case['rates']}"
    shape = f"B{case['B']} H{case['H']} K{case['K']} D{case['D']}"
    where = "1dev" if case["world1"] else case["layout"]
    extra = f" {case['sparse_pattern']}" if "sparse_pattern" in case else ""
    return (f"{case['variant']:<12} {case['pattern']:<10} {'causal' if case['causal'] else 'full':<6} "
            f"{where:<10} split={'T' if case['split'] else 'F'} N={case['N']} {shape} {case['dtype']}"
            f"{extra}  segs={segs}")


def markdown(results: List[dict], skipped: Dict[str, str], info: dict, world: int) -> str:
    lines = [
        f"# GPU parity ({info.get('device_name')}, {world} ranks, torch {info.get('torch')})",
        "",
        "rel = ||x - ref|| / ||ref|| vs float64 `reference_attention`, max over ranks; "
        "tolerance 2e-2 (bf16), 1e-4 (float32, TF32 off).",
        "",
        "| # | variant | pattern | causal | layout | split | N | B | H | K | D | dtype | out | lse | dq | dk | dv | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results):
        e = r.get("errors", {})
        lay = "1-device" if r["world1"] else r["layout"]
        pat = r["pattern"] + (f" ({r['sparse_pattern']})" if "sparse_pattern" in r else "")
        lines.append(
            f"| {i} | {r['variant']} | {pat} | {r['causal']} | {lay} | {r['split']} | {r['N']} | {r['B']} | "
            f"{r['H']} | {r['K']} | {r['D']} | {r['dtype']} | "
            + " | ".join(fmt(e.get(n), ".2e") for n in ("out", "lse", "dq", "dk", "dv"))
            + f" | {r['status']}{(': ' + r['error']) if r.get('error') else ''} |")
    if skipped:
        lines += ["", "Skipped variants (rejected by create_ring_attention):", ""]
        lines += [f"- {v}: {why}" for v, why in skipped.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU + gloo, tiny sizes (a smoke test of this script)")
    ap.add_argument("--n", type=int, default=None, help="sequence length of the grid (default 2048; dry run 128)")
    ap.add_argument("--variants", default=",".join(ALL_VARIANTS), help="comma-separated variant names")
    ap.add_argument("--timeout-s", type=float, default=120.0, help="process-group timeout (hang guard)")
    args = ap.parse_args()
    if args.n is None:
        args.n = 128 if args.dry_run else 2048

    d = Dist(args.dry_run, args.timeout_s)
    if not args.dry_run and not d.cuda:
        print("gpu_parity.py needs CUDA; use --dry-run on a CPU machine", flush=True)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 cases are checked to 1e-4
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    info = env_info(d.device)
    info.update(world=d.world, backend=d.backend, dry_run=args.dry_run)
    d.log(f"gpu_parity: {info.get('device_name')} x{d.world} ({d.backend}), torch {info['torch']}, "
          f"cuda {info.get('cuda')}, cudnn {info.get('cudnn')}")

    variants, skipped = [], {}
    for v in [s.strip() for s in args.variants.split(",") if s.strip()]:
        try:
            create_ring_attention(v)
            variants.append(v)
        except (ValueError, TypeError) as exc:
            skipped[v] = short_error(exc)
            d.log(f"skip variant {v!r}: {skipped[v]}")

    cases = build_cases(args, variants)
    d.log(f"{len(cases)} cases over variants {variants}")
    results: List[dict] = []
    n_tracebacks = 0
    t_start = time.monotonic()
    for i, case in enumerate(cases):
        t0 = time.monotonic()
        error = None
        errs = {n: math.nan for n in ("out", "lse", "dq", "dk", "dv")}
        try:
            errs = run_case(case, d, args.dry_run)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            error = short_error(exc)
            n_tracebacks += 1
            if n_tracebacks <= 3:  # the first few in full, then the one-line summary only
                print(f"[rank {d.rank}] case {i} raised:\n{traceback.format_exc()}", flush=True)
        d.sync()
        names = ("out", "lse", "dq", "dk", "dv")
        agreed = d.agree_max([errs[n] if not math.isnan(errs[n]) else -1.0 for n in names]
                             + [1.0 if error else 0.0])
        errs = {n: (math.nan if agreed[j] == -1.0 else agreed[j]) for j, n in enumerate(names)}
        if agreed[-1] > 0:
            msgs = [m for m in d.gather_objects(error) if m]
            error = msgs[0] if msgs else "raised on another rank"
        tol = TOL[case["dtype"]]
        finite = [x for x in errs.values() if not math.isnan(x)]
        if error:
            status = "ERROR"
        elif not finite or max(finite) > tol:
            status = "FAIL"
        else:
            status = "PASS"
        rec = dict(case, errors=errs, tol=tol, status=status, error=error,
                   max_err=max(finite) if finite else math.nan, seconds=round(time.monotonic() - t0, 3))
        results.append(rec)
        worst = fmt(rec["max_err"], ".2e")
        d.log(f"[{i + 1:3d}/{len(cases)}] {status:<5} max={worst:<9} {describe(case)}"
              + (f"  !! {error}" if error else ""))
        if d.is_main and (i % 16 == 15 or i == len(cases) - 1):
            write_json(out_dir() / "gpu_parity.json",
                       dict(info=info, skipped_variants=skipped, results=results, complete=i == len(cases) - 1))

    n_pass = sum(r["status"] == "PASS" for r in results)
    n_fail = sum(r["status"] == "FAIL" for r in results)
    n_err = sum(r["status"] == "ERROR" for r in results)
    if d.is_main:
        md = markdown(results, skipped, info, d.world)
        (out_dir() / "gpu_parity.md").write_text(md)
        write_json(out_dir() / "gpu_parity.json",
                   dict(info=info, skipped_variants=skipped, results=results, complete=True,
                        summary=dict(passed=n_pass, failed=n_fail, errors=n_err,
                                     seconds=round(time.monotonic() - t_start, 1))))
        print("\n## gpu_parity summary", flush=True)
        print(f"device: {info.get('device_name')} x{d.world}, torch {info['torch']}, backend {d.backend}")
        print("| variant | cases | pass | fail | error | worst bf16 rel | worst float32 rel |")
        print("|---|---|---|---|---|---|---|")
        for v in variants:
            rs = [r for r in results if r["variant"] == v]
            wb = max([r["max_err"] for r in rs if r["dtype"] == "bf16" and not math.isnan(r["max_err"])],
                     default=math.nan)
            wf = max([r["max_err"] for r in rs if r["dtype"] == "float32" and not math.isnan(r["max_err"])],
                     default=math.nan)
            print(f"| {v} | {len(rs)} | {sum(r['status'] == 'PASS' for r in rs)} | "
                  f"{sum(r['status'] == 'FAIL' for r in rs)} | {sum(r['status'] == 'ERROR' for r in rs)} | "
                  f"{fmt(wb, '.2e')} | {fmt(wf, '.2e')} |")
        for v, why in skipped.items():
            print(f"| {v} | skipped: {why} | | | | | |")
        bad = [(i, r) for i, r in enumerate(results) if r["status"] != "PASS"]
        if bad:
            print(f"\nnot passing ({len(bad)}):")
            for i, r in bad[:25]:
                print(f"  #{i} {r['status']} max={fmt(r['max_err'], '.2e')} {describe(r)}"
                      + (f"  !! {r['error']}" if r.get("error") else ""))
        print(f"\nPARITY {'PASSED' if not (n_fail or n_err) else 'FAILED'}: {n_pass} pass, {n_fail} fail, "
              f"{n_err} error, {time.monotonic() - t_start:.0f}s; files in {out_dir()}", flush=True)
    d.close()
    return 0 if not (n_fail or n_err) else 1


if __name__ == "__main__":
    raise SystemExit(main())
