"""Print the README's performance table from a bench_attention.json (no GPU needed).

    python benchmarks/readme_table.py benchmarks/results/2026-11-26-h200x2/bench_attention.json
"""

import json
import sys

ROWS = ("sdpa-cudnn", "sdpa-flash", "cp-cudnn", "cp-flash", "rl-standard", "rl-standard-flash",
        "rl-distributed", "rl-hilbert", "rl-standard-1gpu")  # block_sparse: bench_variants.py


def main(path: str, sizes=(32768, 131072)) -> None:
    data = json.load(open(path))
    print("| N | pattern | row | GPUs | ms fwd+bwd | TFLOP/s/GPU | peak GiB/GPU | time / torch CP cuDNN |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for pattern in ("dense", "dilated"):
            for key in ROWS:
                for r in data["rows"]:
                    if r["N"] == n and r["pattern"] == pattern and r["key"] == key and r.get("ms"):
                        ratio = r.get("time_vs_cp-cudnn")
                        print(f"| {n // 1024}K | {pattern} | {key} | {r['gpus']} | {r['ms']:.1f} | "
                              f"{r['tflops_per_gpu']:.0f} | {max(r['peak_gib_per_rank']):.1f} | "
                              f"{'-' if ratio is None else f'{ratio:.2f}'} |")


if __name__ == "__main__":
    main(sys.argv[1])
