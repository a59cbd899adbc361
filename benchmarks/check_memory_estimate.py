"""The pre-flight's memory estimate against the measured peak of one training step (one GPU).

    python benchmarks/check_memory_estimate.py                 # the default configurations
    python benchmarks/check_memory_estimate.py --configs 350m:128256:offload:32768,65536
    python benchmarks/check_memory_estimate.py --dry-run       # CPU smoke test (tiny model)

Each configuration ``preset:vocab:checkpointing:len1,len2,...[:plain]`` (checkpointing: none |
selective | full | offload, offload = conf/checkpointing/offload.yaml; ``plain``: the plain head
and its (T, V) logits, module.loss_chunk_tokens=0) runs two training steps per length
as LongDocumentLM trains under Lightning with bf16-mixed: autocast forward, its loss (chunked
by default), backward, clipping, AdamW. The peak of the second step
(``torch.cuda.max_memory_allocated``) is compared with ``memory_estimate.estimate_memory``
without the terms a bare step does not have (DDP buckets, the CUDA context), and the slope
between two lengths (bytes per token) with the estimate's. A ratio far from 1 means re-fitting
``memory_estimate.BYTES`` (``fit_activations``, ``fit_logits`` or a term); the JSON under
``$OUT`` (or ``--out``) keeps every figure.
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import torch

from ring_lightning.models import memory_estimate as mem
from ring_lightning.models.model_config import PRESETS
from ring_lightning.training.module import LongDocumentLM

DEFAULT = ("350m:259:full:32768,65536:plain;350m:259:selective:32768,65536:plain;350m:128256:full:16384,32768:plain;"
           "350m:128256:full:32768,65536;"
           "350m:128256:offload:65536,131072;350m:259:offload:131072,262144;1b:128256:offload:65536,131072")


def step_peak(preset: str, vocab: int, checkpointing: str, seq_len: int, device: torch.device,
              chunk: "int | None") -> float:
    """Peak bytes allocated during the second of two training steps."""
    options = dict(mem.OFFLOAD_OPTIONS) if checkpointing == "offload" else {"checkpointing": checkpointing}
    module = LongDocumentLM(model={"preset": preset, "vocab_size": vocab, **options}, warmup_steps=0,
                            max_steps=10, loss_chunk_tokens=chunk).to(device)
    optimizer = module.configure_optimizers()["optimizer"]
    ids = torch.randint(min(vocab, 259), (1, seq_len), device=device)
    batch = module.prepare_batch({"input_ids": ids, "labels": ids.roll(-1, 1)})
    cuda = device.type == "cuda"
    for i in range(2):
        if cuda and i == 1:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss_sum, count, _ = module.token_loss(batch)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    del module, optimizer, batch
    gc.collect()
    return float(peak)


def estimated(preset: str, vocab: int, checkpointing: str, seq_len: int, cuda: bool, chunk: "int | None") -> float:
    options = dict(mem.OFFLOAD_OPTIONS) if checkpointing == "offload" else {"checkpointing": checkpointing}
    est = mem.estimate_memory({**PRESETS[preset], "vocab_size": vocab, **options}, seq_len,
                              precision="bf16-mixed" if cuda else "32-true", loss_chunk_tokens=chunk)
    return est.device_total - est.device.get("DDP buckets", 0) - est.device.get("CUDA context", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT, help="preset:vocab:checkpointing:len1,len2;...")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, two short lengths")
    args = parser.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    configs = "tiny:259:offload:64,128;tiny:320:full:64,128:plain" if args.dry_run else args.configs
    rows = []
    print("| preset | vocab | checkpointing | loss | tokens | measured GiB | estimated GiB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in configs.split(";"):
        preset, vocab, mode, lengths, *plain = spec.split(":")
        chunk = 0 if plain == ["plain"] else None  # None: linear_cross_entropy's default chunks
        loss = "plain" if chunk == 0 else "chunked"
        points = []
        for n in (int(x) for x in lengths.split(",")):
            torch.cuda.empty_cache() if cuda else None
            try:
                peak = step_peak(preset, int(vocab), mode, n, device, chunk)
            except torch.OutOfMemoryError:
                peak = float("inf")
            est = estimated(preset, int(vocab), mode, n, cuda, chunk)
            points.append((n, peak, est))
            rows.append(dict(preset=preset, vocab=int(vocab), checkpointing=mode, loss=loss, tokens=n, measured=peak,
                             estimated=est))
            print(f"| {preset} | {vocab} | {mode} | {loss} | {n} | {peak / mem.GiB:.2f} | {est / mem.GiB:.2f} | "
                  f"{est / peak:.3f} |", flush=True)
        if len(points) >= 2:
            (n0, p0, e0), (n1, p1, e1) = points[0], points[-1]
            slope_m, slope_e = (p1 - p0) / (n1 - n0), (e1 - e0) / (n1 - n0)
            rows.append(dict(preset=preset, vocab=int(vocab), checkpointing=mode, loss=loss,
                             bytes_per_token_measured=slope_m, bytes_per_token_estimated=slope_e))
            print(f"|   bytes/token | | | | | {slope_m / 1e3:.1f}K | {slope_e / 1e3:.1f}K | {slope_e / slope_m:.3f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "check_memory_estimate.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name() if cuda else "cpu", rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
