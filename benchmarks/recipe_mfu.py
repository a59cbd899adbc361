"""A recipe's logged throughput and MFU next to bench_model.py's bare step on the same module and data.

    python benchmarks/recipe_mfu.py                                  # long_128k_1gpu on one GPU
    python benchmarks/recipe_mfu.py --recipe long_128k_1gpu --steps 30 module.compile=false
    python benchmarks/recipe_mfu.py --dry-run                        # CPU smoke test (tiny model)
    STAGES=recipe bash benchmarks/run_model_gpu.sh                   # the same on the lent GPU image

1. ``python train.py -cd recipes -cn <recipe> trainer.max_steps=<steps>`` (plus the overrides
   given) in ``$OUT/recipe_run``; its last logged ``perf/*`` values (a window of
   ``--window`` steps, after compilation) are read back from ``metrics.jsonl``.
2. The same recipe composed with the same overrides: its module and the first training batch
   of its data (packed documents and all), one training step timed as ``bench_model.py``
   times it (bf16 autocast, float32 loss, clipping, AdamW), FLOPs counted by the same
   ``LongDocumentLM.attention_pairs`` / ``train_flops`` the run logs.

Both count the attention's allowed pairs (documents, segments, block masks: flops.py), so
the two MFU figures differ only by what the Trainer loop costs and by batch-to-batch
variation of the documents. Results: ``$OUT/recipe_mfu.json`` and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_model import train_step_bench  # noqa: E402

METRICS = ("perf/tokens_per_s", "perf/tflops_per_gpu", "perf/mfu", "perf/dense_equivalent_tflops_per_gpu")
DRY_RUN = ["model=tiny", "data.seq_len=512", "data.max_tokens=60000", "module.compile=false", "trainer.accelerator=cpu",
           "trainer.precision=32-true", "trainer.devices=1", "checkpointing=none", "logger=none"]


def run_recipe(recipe: str, steps: int, window: int, overrides: list, run_dir: str) -> dict:
    """train.py on the recipe; the last logged value of each perf/* metric."""
    from ring_lightning.app.run_report import read_metrics

    cmd = [sys.executable, "train.py", "-cd", "recipes", "-cn", recipe, f"trainer.max_steps={steps}",
           f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
           f"+module.throughput_window={window}", f"hydra.run.dir={run_dir}", "logger=csv", *overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    print("\n".join(proc.stdout.splitlines()[-12:]), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    last: dict = {}
    for row in read_metrics(os.path.join(run_dir, "metrics.jsonl")):
        last.update({k: row[k] for k in METRICS if k in row}, step=row["step"])
    return last


def bench_recipe(recipe: str, steps: int, overrides: list, device: torch.device) -> dict:
    """bench_model.py's timed step on the recipe's module and first training batch."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ring_lightning.app.hydra_presets import register_model_presets

    register_model_presets()
    OmegaConf.register_new_resolver("if_cuda", lambda a, b: a if device.type == "cuda" else b, replace=True)
    with initialize_config_dir(str(ROOT / "recipes"), version_base="1.3"):
        cfg = compose(recipe, overrides=[f"hydra.searchpath=[file://{ROOT / 'conf'}]", *overrides,
                                         "paths.output_dir=unused"])
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = instantiate(cfg.module, _convert_="all")
    c = module.model.config
    return train_step_bench(f"{c.n_layers}x{c.dim}", batch["input_ids"].shape[1], c.checkpointing,
                            bool(cfg.module.get("compile")), steps, 2, device, module=module, batch=batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="long_128k_1gpu")
    ap.add_argument("--steps", type=int, default=30, help="train.py steps (the logged window is the last ones)")
    ap.add_argument("--window", type=int, default=10, help="steps averaged into the logged perf/* values")
    ap.add_argument("--bench-steps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, few steps")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both (e.g. module.compile=false)")
    args = ap.parse_args()
    overrides = list(args.overrides)
    if args.dry_run:
        overrides, args.steps, args.window, args.bench_steps = DRY_RUN + overrides, 4, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    os.makedirs(args.out, exist_ok=True)
    logged = run_recipe(args.recipe, args.steps, args.window, overrides, os.path.abspath(f"{args.out}/recipe_run"))
    bare = bench_recipe(args.recipe, args.bench_steps, overrides, device)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    with open(os.path.join(args.out, "recipe_mfu.json"), "w") as f:
        json.dump(dict(card=card, recipe=args.recipe, overrides=overrides, logged=logged,
                       bench={k: v for k, v in bare.items() if k != "times"}), f, indent=1)
    print(f"\n| {args.recipe} ({card}) | tokens/s | TFLOP/s per GPU (allowed pairs) | MFU |")
    print("|---|---|---|---|")
    fmt = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"  # noqa: E731
    print(f"| train.py, logged at step {logged.get('step')} | {fmt(logged.get('perf/tokens_per_s'), '.0f')} | "
          f"{fmt(logged.get('perf/tflops_per_gpu'), '.1f')} | {fmt(logged.get('perf/mfu'), '.3f')} |")
    print(f"| bench_model.py step, same module and batch | {fmt(bare.get('tokens_per_s'), '.0f')} | "
          f"{fmt(bare.get('tflops'), '.1f')} | {fmt(bare.get('mfu'), '.3f')} |")
    if "perf/dense_equivalent_tflops_per_gpu" in logged:
        print(f"(dense-equivalent, as if no document were masked: "
              f"{logged['perf/dense_equivalent_tflops_per_gpu']:.1f} TFLOP/s per GPU)")


if __name__ == "__main__":
    main()
