"""sp=2 against sp=1 on GPUs with NCCL, float32 and bf16, plus every compression hook on NCCL.

Not a pytest test (CI has no GPU): a script for a 2-GPU machine. It launches
``_strategy_launch_script.py`` through Lightning's own launcher for each run, then prints
a table and writes ``<out>/strategy_gpu_check.json``.

    python tests/distributed/_strategy_gpu_check.py OUT_DIR [--accelerator cpu] [--parts parity,compression]

Where only ``pytorch_lightning`` is installed, put a copy of the ``lightning`` package
directory (pure Python) on ``PYTHONPATH``. Seen on 2x H200 (NCCL, torch 2.11), 4 steps:
sp=2 vs sp=1 float32: loss 4.8e-7, gradients 6e-8 (2.2e-7 of the largest entry);
bf16-mixed: loss 1.2e-3, gradients 4.5e-3 of the largest entry.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
STEPS = 4


def launch(out: Path, tag: str, accelerator: str, devices: int, sp: int, precision: str, compression: str,
           ratio: float = 0.1) -> list:
    cmd = [sys.executable, str(HERE / "_strategy_launch_script.py"), str(out), "--tag", tag,
           "--accelerator", accelerator, "--devices", str(devices), "--sp", str(sp),
           "--precision", precision, "--compression", compression, "--compression-ratio", str(ratio),
           "--steps", str(STEPS)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    print(f"launching {tag} ({devices} x {accelerator}, sp={sp}, {precision}, {compression})", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{tag} failed:\n{proc.stderr[-4000:]}")
    return [torch.load(out / f"{tag}_rank{r}.pt") for r in range(devices)]


def compare(ref: list, got: list) -> dict:
    """Largest loss and gradient differences over all steps and ranks.

    The gradient difference is also given relative to the largest gradient entry of the
    step: some gradients are zero in exact arithmetic (the key projection's bias cannot
    change a softmax) and per-parameter relative errors of rounding noise mean nothing.
    """
    loss_diff = max(abs(a - b) for res in got for a, b in zip(res["loss"], ref[0]["loss"]))
    grad_abs, grad_rel = 0.0, 0.0
    for res in got:
        for step_got, step_ref in zip(res["grads"], ref[0]["grads"]):
            scale = max(g.abs().max().item() for g in step_ref.values())
            diff = max((step_got[n] - g).abs().max().item() for n, g in step_ref.items())
            grad_abs, grad_rel = max(grad_abs, diff), max(grad_rel, diff / scale)
    return {"max_loss_abs_diff": loss_diff, "max_grad_abs_diff": grad_abs, "max_grad_diff_rel_to_largest": grad_rel,
            "same_samples": all(res["samples"] == ref[0]["samples"] for res in got)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--accelerator", default="gpu")
    parser.add_argument("--parts", default="parity,compression")
    args = parser.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {}
    if "parity" in args.parts:
        for precision in ("32-true", "bf16-mixed"):
            ref = launch(out, f"sp1_{precision}", args.accelerator, 1, 1, precision, "none")
            got = launch(out, f"sp2_{precision}", args.accelerator, 2, 2, precision, "none")
            row = dict(compare(ref, got), backend=got[0]["backend"], device=got[0]["device"], losses_sp1=ref[0]["loss"])
            report[f"sp2_vs_sp1_{precision}"] = row
    if "compression" in args.parts:
        ref = launch(out, "sp1_ref", args.accelerator, 1, 1, "32-true", "none")
        # At ratio 1.0 top-k and random-k send everything: the numbers must not change.
        for method in ("topk", "randomk"):
            got = launch(out, f"sp2_{method}_lossless", args.accelerator, 2, 2, "32-true", method, ratio=1.0)
            report[f"compression_{method}_ratio1_vs_sp1"] = dict(compare(ref, got), backend=got[0]["backend"])
        for method in ("topk", "randomk", "powersgd", "bf16"):
            got = launch(out, f"sp2_{method}", args.accelerator, 2, 2, "32-true", method)
            report[f"compression_{method}"] = {
                "backend": got[0]["backend"], "compression_ratio": got[0]["compression_ratio"],
                "losses": got[0]["loss"], "ranks_agree": got[0]["loss"] == got[1]["loss"],
            }
    for name, row in report.items():
        print(name, json.dumps(row))
    (out / "strategy_gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
