"""Training speed of the reference model on one GPU: tokens/s, MFU, peak memory, longest sequence.

    python benchmarks/bench_model.py                      # the table of the README (one GPU)
    python benchmarks/bench_model.py --configs 350m:32768:selective --steps 3
    python benchmarks/bench_model.py --longest 350m:full:262144,524288,1048576
    python benchmarks/bench_model.py --dry-run            # CPU smoke test (tiny model)

One training step is exactly what ``LongDocumentLM`` does under Lightning with
``precision=bf16-mixed`` and ``gradient_clip_val=1.0``: bf16 autocast forward, float32
cross-entropy, backward, gradient-norm clipping, the module's own AdamW step. It runs
without the Trainer, so the figures are the model's, not the loop's (train.py reports
its own tokens/s and MFU as perf/*). Timed with CUDA events over ``--steps`` steps after
``--warmup`` (compilation, cuDNN plans and the allocator's growth stay out).

MFU = model FLOPs per token (``LongDocumentLM.train_flops``: 6 x parameters plus the
attention's allowed pairs, counted by ``ring_lightning.models.flops`` exactly as the training
module logs ``perf/mfu``; here random tokens, one document: dense causal) x tokens/s / the
card's dense bf16 peak (989 TFLOP/s for H100/H200). Recomputation from activation
checkpointing is NOT counted as useful work. ``recipe_mfu.py`` runs this step on a recipe's
own module and batch (packed documents) next to the recipe's logged figures.

Also measured: the attention core alone at the model's shapes (fwd+bwd TFLOP/s, the
ceiling the model can approach at long context) and AdamW's step time fused vs foreach.
Results: a JSON list under ``$OUT`` (or ``--out``) and a table on stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch
import torch.nn.functional as F

from ring_lightning.attention import create_ring_attention
from ring_lightning.models.flops import PEAK_BF16_FLOPS
from ring_lightning.training.module import LongDocumentLM

DEFAULT_CONFIGS = "350m:32768:selective,350m:131072:selective,1b:65536:selective,1b:131072:selective"


def _peak_flops() -> float:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), float("nan"))


def _timed(fn, steps: int, warmup: int, cuda: bool) -> list:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_step_bench(preset: str, seq_len: int, checkpointing: str, compile_blocks: bool, steps: int,
                     warmup: int, device: torch.device, module: "LongDocumentLM | None" = None,
                     batch: "dict | None" = None) -> dict:
    """Time ``steps`` training steps of LongDocumentLM at ``seq_len`` tokens (batch 1), or of a given
    ``module`` on a given whole ``batch`` (recipe_mfu.py: a recipe's module and first batch, its
    packed documents masked as in training)."""
    cuda = device.type == "cuda"
    compile_blocks = compile_blocks and cuda  # compiled only on CUDA
    row = dict(kind="train", preset=preset, seq_len=seq_len, checkpointing=checkpointing, compile=compile_blocks)
    if module is None:
        module = LongDocumentLM(model={"preset": preset, "checkpointing": checkpointing},
                                attention={"variant": "standard"}, max_steps=1000, compile=compile_blocks)
    module = module.to(device)
    if compile_blocks and cuda:
        module.model.compile_blocks()
    optimizer = module.configure_optimizers()["optimizer"]
    if batch is None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        tokens = torch.randint(0, module.model.config.vocab_size, (1, seq_len + 1), generator=gen)
        batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    # the attention work of this batch, counted as the training module logs it (flops.py)
    pairs, (B, N) = module.attention_pairs(batch), batch["input_ids"].shape
    batch = {k: v.to(device) for k, v in batch.items()}
    batch.setdefault("position_ids", torch.arange(N, device=device).expand(B, N))
    documents = module.document_ids(batch)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)

    def step():
        with autocast:
            logits = module(batch["input_ids"], batch["position_ids"], documents)
        loss_sum, count = module.compute_loss(logits, batch)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        times = _timed(step, steps, warmup, cuda)
    except torch.OutOfMemoryError:
        row.update(status="OOM")
        return row
    step_s = sorted(times)[len(times) // 2]
    flops_per_token = module.train_flops(B, N, pairs) / (B * N)
    tokens_per_s = B * N / step_s
    row.update(status="ok", step_s=step_s, tokens_per_s=tokens_per_s,
               tflops=flops_per_token * tokens_per_s / 1e12, mfu=flops_per_token * tokens_per_s / _peak_flops(),
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               params_m=module.model.num_params() / 1e6, times=times)
    return row


def attention_bench(preset: str, seq_len: int, steps: int, warmup: int, device: torch.device) -> dict:
    """The attention core alone at the preset's head shapes: causal fwd+bwd (the model's ceiling)."""
    from ring_lightning.models.model import ModelConfig

    c = ModelConfig.preset(preset)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, seq_len, c.n_heads, c.head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, seq_len, c.n_kv_heads, c.head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    core = create_ring_attention("standard")
    rows = []
    for name, fn in (("ring_lightning", lambda: core(q, k, v, is_causal=True, already_split=True)),
                     ("sdpa", lambda: F.scaled_dot_product_attention(
                         q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                         enable_gqa=True).transpose(1, 2))):
        def step():
            fn().backward(torch.ones_like(q))
        times = _timed(step, steps, warmup, device.type == "cuda")
        t = sorted(times)[len(times) // 2]
        flops = 4 * seq_len * seq_len * c.n_heads * c.head_dim / 2 * 3.5  # causal; bwd = 2.5x fwd
        rows.append(dict(kind="attention", impl=name, preset=preset, seq_len=seq_len, ms=t * 1e3,
                         tflops=flops / t / 1e12))
    return rows


def optimizer_bench(preset: str, device: torch.device, steps: int) -> list:
    """AdamW step time, fused vs foreach, on the preset's parameters."""
    from ring_lightning.models.model import LongDocTransformer

    model = LongDocTransformer({"preset": preset}).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    rows = []
    for impl in ("foreach", "fused"):
        if impl == "fused" and device.type != "cuda":
            continue
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **{impl: True})
        times = _timed(opt.step, steps, 3, device.type == "cuda")
        rows.append(dict(kind="optimizer", preset=preset, impl=impl, ms=sorted(times)[len(times) // 2] * 1e3))
        del opt
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help="preset:seq_len:checkpointing[:on|off|both compile], comma-separated")
    ap.add_argument("--compile", default="on", choices=["on", "off", "both"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--longest", default="", help="preset:checkpointing:len1,len2,... (ascending; stops at OOM)")
    ap.add_argument("--attention", default="350m:131072", help="preset:seq_len for the attention-only row ('' = none)")
    ap.add_argument("--optimizer", default="350m", help="preset for the AdamW row ('' = none)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, short sequences")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.dry_run:
        args.configs, args.longest, args.compile = "tiny:256:selective,tiny:256:full", "tiny:full:256,512", "off"
        args.attention, args.optimizer, args.steps, args.warmup = "tiny:256", "tiny", 1, 1
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"card: {card}  torch {torch.__version__}", flush=True)
    rows = []
    compiles = {"on": [True], "off": [False], "both": [False, True]}[args.compile]
    if args.optimizer:
        rows += optimizer_bench(args.optimizer, device, max(args.steps, 5))
        print(rows[-2:], flush=True)
    if args.attention:
        preset, n = args.attention.split(":")
        rows += attention_bench(preset, int(n), args.steps, args.warmup, device)
        print(rows[-2:], flush=True)
        _free()
    for spec in filter(None, args.configs.split(",")):
        preset, n, ckpt, *comp_spec = spec.split(":")  # optional 4th field: on | off | both
        for comp in (compiles if not comp_spec else {"on": [True], "off": [False], "both": [False, True]}[comp_spec[0]]):
            rows.append(train_step_bench(preset, int(n), ckpt, comp, args.steps, args.warmup, device))
            print({k: v for k, v in rows[-1].items() if k != "times"}, flush=True)
            _free()
    if args.longest:
        preset, ckpt, lengths = args.longest.split(":")
        for n in map(int, lengths.split(",")):
            row = train_step_bench(preset, n, ckpt, compiles[-1], 1, 0, device)
            row["kind"] = "longest"
            rows.append(row)
            print({k: v for k, v in row.items() if k != "times"}, flush=True)
            _free()
            if row["status"] != "ok":
                break
    with open(os.path.join(args.out, "bench_model.json"), "w") as f:
        json.dump(dict(card=card, torch=torch.__version__, rows=rows), f, indent=1)
    print(f"\n| model | tokens | checkpointing | compile | tokens/s | TFLOP/s | MFU | peak GiB | ({card})")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] in ("train", "longest") and r["status"] == "ok":
            peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
            print(f"| {r['preset']} | {r['seq_len']} | {r['checkpointing']} | {r['compile']} | "
                  f"{r['tokens_per_s']:.0f} | {r['tflops']:.0f} | {r['mfu']:.3f} | {peak} |")
        elif r["kind"] in ("train", "longest"):
            print(f"| {r['preset']} | {r['seq_len']} | {r['checkpointing']} | {r['compile']} | {r['status']} |")


if __name__ == "__main__":
    main()
