"""Train the test LM under Lightning's own launcher (``Trainer(devices=N)``) and save each rank's record.

Run as a script (by test_strategy.py on CPU, by _strategy_gpu_check.py on GPUs):
Lightning re-launches this file for the other ranks and creates the process group
itself, so the strategy's whole setup path runs. Each rank writes ``<out>/<tag>_rank<k>.pt``.

    python tests/distributed/_strategy_launch_script.py OUT_DIR --devices 2 --sp 2
    python tests/distributed/_strategy_launch_script.py OUT_DIR --accelerator gpu --precision bf16-mixed
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _strategy_worker as W  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

from ring_lightning.parallel.strategy import RingStrategy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--sp", type=int, default=2)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--compression", default="none")
    parser.add_argument("--compression-ratio", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=W.STEPS_PER_EPOCH)
    parser.add_argument("--tag", default="run")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = W.TinyRingLM("multihead")
    strategy = RingStrategy(sequence_parallel_size=args.sp, compression=args.compression,
                            compression_ratio=args.compression_ratio)
    trainer = Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=strategy, precision=args.precision,
        max_steps=args.steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    train, _ = W._loaders(dp=args.devices // args.sp)
    trainer.fit(model, train_dataloaders=train)
    record = {k: model.record[k] for k in ("loss", "grads", "samples")}
    record["grads"] = [{n: g.float().cpu() for n, g in step.items()} for step in record["grads"]]
    record.update(
        sp_rank=strategy.sp_rank, dp_rank=strategy.dp_rank, mesh_shape=tuple(strategy.device_mesh.shape),
        backend=torch.distributed.get_backend(), compression_ratio=strategy.compression_ratio,
        device=torch.cuda.get_device_name() if args.accelerator == "gpu" else "cpu",
    )
    torch.save(record, os.path.join(args.out_dir, f"{args.tag}_rank{strategy.global_rank}.pt"))


if __name__ == "__main__":
    main()
