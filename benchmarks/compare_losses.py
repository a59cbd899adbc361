"""Per-step training losses of several runs side by side (their metrics.jsonl), with each run's
largest relative difference from the first: how close two ways of holding the same model train.

    python benchmarks/compare_losses.py /tmp/parity_ddp/metrics.jsonl /tmp/parity_fsdp/metrics.jsonl
"""

import json
import sys


def losses(path):
    """{step: train/loss} of one run's metrics.jsonl."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def main(paths):
    runs = [losses(p) for p in paths]
    steps = sorted(set.intersection(*(set(r) for r in runs)))
    if not steps:
        print("no step is in every run")
        return 1
    print("| step | " + " | ".join(paths) + " |")
    for s in steps:
        print(f"| {s} | " + " | ".join(f"{r[s]:.6f}" for r in runs) + " |")
    for path, run in zip(paths[1:], runs[1:]):
        worst = max(abs(run[s] - runs[0][s]) / abs(runs[0][s]) for s in steps)
        print(f"{path}: largest relative difference from {paths[0]} over {len(steps)} steps: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
