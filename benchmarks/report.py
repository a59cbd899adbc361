"""Turn bench_attention rows into ratios, log lines and tables.

``bench_attention.py`` writes ``bench_attention.json`` (every row, with ``add_ratios``
applied) and ``bench_attention.md`` (``markdown``). Run as a script, this file prints the
top-level README's shorter performance table from such a JSON (no GPU needed):

    python benchmarks/report.py benchmarks/results/2026-11-26-h200x2/bench_attention.json
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List, Sequence

from _common import fmt

#: how the rows' FLOPs are counted (ring_lightning/models/flops.py), stored in the JSON's info
FLOPS_NOTE = ("fwd = 4*B*D*P (P = allowed (q,k) pairs over heads, causal m^2/2); bwd = 2.5*fwd; "
              "TFLOP/s per GPU = (fwd+bwd)/GPUs of the row/time")
PEERS = ("cp-cudnn", "sdpa-cudnn")  # the dense rows every other row is compared with
README_ROWS = ("sdpa-cudnn", "sdpa-flash", "cp-cudnn", "cp-flash", "rl-standard", "rl-standard-flash",
               "rl-distributed", "rl-hilbert", "rl-standard-1gpu")  # block_sparse: bench_variants.py


def add_ratios(records: List[Dict[str, Any]]) -> None:
    """``tflops_vs_<peer>`` and ``time_vs_<peer>`` against the dense peer rows at the same N."""
    base = {(r["N"], r["key"]): r for r in records if r["pattern"] == "dense" and "tflops_per_gpu" in r}
    for r in records:
        if "tflops_per_gpu" not in r:
            continue
        for peer in PEERS:
            p = base.get((r["N"], peer))
            if p:
                r[f"tflops_vs_{peer}"] = r["tflops_per_gpu"] / p["tflops_per_gpu"]
                r[f"time_vs_{peer}"] = r["ms"] / p["ms"]


def _validation(r: Dict[str, Any], sep: str) -> str:
    return f"{'ok' if r['valid'] else 'FAIL'}{sep}{fmt(max(r['validation'].values()), '.1e')}"


def log_line(r: Dict[str, Any], elapsed_s: float) -> str:
    """The console line of one finished row."""
    head = f"N={r['N']:>7} {r['pattern']:<7} {r['key']:<18}"
    if "skipped" in r:
        return f"{head} skipped: {r['skipped']}"
    if "error" in r:
        return f"{head} ERROR {r['error']}"
    val = f" valid={_validation(r, '(max ')})" if "validation" in r else ""
    refused = f"  refused={r['kernels_refused']}" if r.get("kernels_refused") else ""
    return (f"{head} {r['ms']:9.2f} ms {fmt(r['tflops_per_gpu'], '.4g'):>7} TFLOP/s/GPU  x{r['repeats']}{val}"
            f"{refused}  [{elapsed_s:.0f}s]")


def markdown(records: List[Dict[str, Any]], info: Dict[str, Any], skipped: Dict[str, str]) -> str:
    """The full table, ``bench_attention.md``."""
    lines = [
        f"# Attention fwd+bwd: {info.get('device_name')} x{info['world']}, torch {info['torch']}, "
        f"cuDNN {info.get('cudnn')}, {info['dtype']}, causal={info['causal']}, B={info['batch']} "
        f"H={info['heads']} K={info['kv_heads']} D={info['dim']}",
        "",
        "FLOPs: fwd = 4*B*D*P (P = allowed (query,key) pairs summed over heads; causal m^2/2), "
        "bwd = 2.5*fwd. TFLOP/s/GPU = (fwd+bwd) / GPUs / time. ms = median per rank, max over ranks. "
        "peak = max_memory_allocated (max over ranks), +mem = what the row added. "
        "vs CP/SDPA = TFLOP/s/GPU ratio against dense cp-cudnn / sdpa-cudnn at the same N; "
        "t/CP = time ratio against dense cp-cudnn. "
        f"Dilated: segments {info['dilated_segments']} rates {info['dilated_rates']}.",
        "",
        "| N | pattern | row | GPUs | ms | TFLOP/s/GPU | peak GiB | +mem GiB | vs CP-cuDNN | vs SDPA-cuDNN "
        "| t/CP-cuDNN | valid | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(records, key=lambda r: (r["N"], r["pattern"] != "dense")):
        notes = list(r.get("notes", []))
        if r.get("kernels_refused"):
            notes.append("refused " + ",".join(r["kernels_refused"]))
        if r["pattern"] == "dilated":
            notes.append(f"density {r['density']:.3f}")
        if "skipped" in r or "error" in r:
            msg = ("skipped: " + r["skipped"]) if "skipped" in r else ("ERROR: " + r["error"])
            lines.append(f"| {r['N']} | {r['pattern']} | {r['key']} | {r['gpus']} | - | - | - | - | - | - | - | - | "
                         f"{msg.replace('|', '/')} |")
            continue
        valid = _validation(r, " ") if "validation" in r else "-"
        peak = max(r["peak_gib_per_rank"]) if r.get("peak_gib_per_rank") else None
        added = max(r["added_gib_per_rank"]) if r.get("added_gib_per_rank") else None
        lines.append(
            f"| {r['N']} | {r['pattern']} | {r['key']} | {r['gpus']} | {r['ms']:.2f} | {fmt(r['tflops_per_gpu'], '.4g')} | "
            f"{fmt(peak, '.2f')} | {fmt(added, '.2f')} | {fmt(r.get('tflops_vs_cp-cudnn'), '.2f')} | "
            f"{fmt(r.get('tflops_vs_sdpa-cudnn'), '.2f')} | {fmt(r.get('time_vs_cp-cudnn'), '.2f')} | {valid} | "
            f"{'; '.join(notes).replace('|', '/')} |")
    if skipped:
        lines += ["", "Variants rejected by create_ring_attention: "
                  + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    lines += ["", "Anchors (reference numbers of the design notes, docs/ARCHITECTURE.md; 2x H100, torch 2.11, "
              "causal bf16 B=1 H=32 D=128): SDPA cuDNN ~550, flash ~325 TFLOP/s (1 GPU); torch CP 2 GPUs "
              "at 128K ~513 (cuDNN), ~309 (flash) TFLOP/s/GPU."]
    return "\n".join(lines) + "\n"


def readme_table(data: Dict[str, Any], sizes: Sequence[int] = (32768, 131072)) -> str:
    """The README's table: the rows of ``README_ROWS`` that ran, at ``sizes``, dense then dilated."""
    lines = ["| N | pattern | row | GPUs | ms fwd+bwd | TFLOP/s/GPU | peak GiB/GPU | time / torch CP cuDNN |",
             "|---|---|---|---|---|---|---|---|"]
    for n in sizes:
        for pattern in ("dense", "dilated"):
            for key in README_ROWS:
                for r in data["rows"]:
                    if r["N"] == n and r["pattern"] == pattern and r["key"] == key and r.get("ms"):
                        ratio = r.get("time_vs_cp-cudnn")
                        lines.append(f"| {n // 1024}K | {pattern} | {key} | {r['gpus']} | {r['ms']:.1f} | "
                                     f"{r['tflops_per_gpu']:.0f} | {max(r['peak_gib_per_rank']):.1f} | "
                                     f"{'-' if ratio is None else f'{ratio:.2f}'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/report.py path/to/bench_attention.json")
    with open(sys.argv[1]) as f:
        print(readme_table(json.load(f)))
