"""The longest sequence per GPU: bytes per token of each memory option, the peer, the cost.

    python benchmarks/bench_memory.py                 # every suite (one H200: ~9 min)
    python benchmarks/bench_memory.py --suite slopes  # peak at 32K and 64K -> bytes/token, longest
    python benchmarks/bench_memory.py --suite cost    # tokens/s of each option at 128K
    python benchmarks/bench_memory.py --suite longest # one whole step at the target lengths
    python benchmarks/bench_memory.py --dry-run       # CPU smoke test (tiny shapes)

One training step is what ``LongDocumentLM`` does under Lightning with ``bf16-mixed``: bf16
autocast forward, the module's own loss (``loss_sums``: the chunked head + cross-entropy
unless the option says ``logits``), backward, ``clip_grad_norm_(1.0)``, AdamW. Batch 1, one
sequence on one GPU. Peak = ``torch.cuda.max_memory_allocated`` over the second step (the
first allocates AdamW's state); host = the pinned bytes of the offloaded inputs.

Bytes per token = (peak at 64K - peak at 32K) / 32K; longest = (card memory - intercept) /
bytes per token (an extrapolation: the ``longest`` suite runs the real thing). Options:

    full-logits   checkpointing=full, plain logits (before the memory options)
    selective-logits
    full          full + the chunked loss
    tiles         full + MLP tiles + chunked loss
    offload       full + activations on the host + chunked loss
    all           full + offload + tiles + chunked loss (= checkpointing=offload)
    hf-gc / hf-gc-offload   Hugging Face LlamaForCausalLM of the same shape, its gradient
                  checkpointing, and with its own offload=True (the peer)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from ring_lightning.training.module import LongDocumentLM

OPTIONS = {
    "full-logits": (dict(checkpointing="full"), 0),
    "selective-logits": (dict(checkpointing="selective"), 0),
    "full": (dict(checkpointing="full"), None),
    "tiles": (dict(checkpointing="full", mlp_tile_tokens=16384), None),
    "offload": (dict(checkpointing="full", offload_activations=True), None),
    "all": (dict(checkpointing="full", offload_activations=True, mlp_tile_tokens=16384), None),
    "all-k2": (dict(checkpointing="full", offload_activations=True, mlp_tile_tokens=16384,
                    blocks_per_checkpoint=2), None),
    "all-k3": (dict(checkpointing="full", offload_activations=True, mlp_tile_tokens=16384,
                    blocks_per_checkpoint=3), None),
}
# A LongNet pattern (Ding et al. 2023) whose work grows linearly with the length: the long
# runs measure memory, and dense causal attention at 1M tokens takes minutes per step.
DILATED = {"segment_lengths": [4096, 16384, 65536, 262144], "dilation_rates": [1, 4, 16, 64]}
SLOPES = ["350m:259:full-logits", "350m:259:selective-logits", "350m:259:full", "350m:259:all",
          "350m:128256:full-logits", "350m:128256:full", "350m:128256:tiles", "350m:128256:offload",
          "350m:128256:all", "1b:128256:all", "350m:259:hf-gc", "350m:259:hf-gc-offload",
          "350m:128256:hf-gc", "350m:128256:hf-gc-offload"]
COST = ["350m:128256:full", "350m:128256:tiles", "350m:128256:offload", "350m:128256:all",
        "350m:259:full-logits", "350m:259:full"]
LONGEST = ["350m:128256:all-k2:1048576", "1b:128256:all-k2:524288", "350m:259:all-k3:2097152"]


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _option(option: str):
    """``name[+c<tokens>][+t<tokens>]``: an OPTIONS entry, with the loss's chunk (``+c``) or the
    tile (``+t``) set: ``tiles+t32768``, ``full+c4096``."""
    name, *extras = option.split("+")
    model_fields, chunk = OPTIONS[name]
    model_fields = dict(model_fields)
    for extra in extras:
        if extra.startswith("c"):
            chunk = int(extra[1:])
        elif extra.startswith("t"):
            model_fields["mlp_tile_tokens"] = int(extra[1:])
        else:
            raise ValueError(f"option {option!r}: '+{extra}' is neither +c<chunk tokens> nor +t<tile tokens>")
    return model_fields, chunk


def _ours(preset: str, vocab: int, option: str, dilated: bool, device):
    model_fields, chunk = _option(option)
    attention = {"variant": "standard", **(DILATED if dilated else {})}
    module = LongDocumentLM(model={"preset": preset, "vocab_size": vocab, **model_fields}, attention=attention,
                            max_steps=1000, loss_chunk_tokens=chunk).to(device)
    optimizer = module.configure_optimizers()["optimizer"]

    def loss_of(batch):
        loss_sum, count, _ = module.loss_sums(module.prepare_batch(batch))
        return loss_sum / count

    host = (lambda: module.model._offload.host_bytes) if module.model._offload is not None else (lambda: 0)
    return module, optimizer, loss_of, host


def _hf(preset: str, vocab: int, option: str, seq_len: int, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ring_lightning.models.model_config import ModelConfig

    c = ModelConfig.preset(preset, vocab_size=vocab)
    config = LlamaConfig(vocab_size=vocab, hidden_size=c.dim, intermediate_size=c.hidden_dim,
                         num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                         num_key_value_heads=c.n_kv_heads, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
                         max_position_embeddings=seq_len, tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa").to(device)
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if option == "hf-gc-offload":
        kwargs["offload"] = True
    model.gradient_checkpointing_enable(**kwargs)
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def loss_of(batch):
        return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    return model, optimizer, loss_of, lambda: 0


def one_row(spec: str, seq_len: int, device, dilated: bool = False, steps: int = 2) -> dict:
    preset, vocab, option = spec.split(":")[:3]
    vocab = int(vocab)
    row = dict(spec=spec, preset=preset, vocab=vocab, option=option, seq_len=seq_len, dilated=dilated)
    cuda = device.type == "cuda"
    try:
        if option.startswith("hf-"):
            model, optimizer, loss_of, host = _hf(preset, vocab, option, seq_len, device)
        else:
            model, optimizer, loss_of, host = _ours(preset, vocab, option, dilated, device)
    except ImportError as err:
        row.update(status=f"skipped ({err})")
        return row
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (1, seq_len + 1), generator=gen).to(device)
    batch = {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}
    times, losses = [], []
    try:
        for i in range(steps):
            if i == steps - 1 and cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = loss_of(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as err:  # how far it got: the peak before the failed allocation
        row.update(status="OOM", peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                   oom=str(err)[:160], steps_done=len(losses))
        del model, optimizer
        return row
    # the first step allocates AdamW's state and warms the kernels: the mean of the others
    timed = times[1:] or times
    step_s = sum(timed) / len(timed)
    row.update(status="ok" if all(l == l and abs(l) < 1e4 for l in losses) else "non-finite",
               losses=losses, step_s=step_s, step_times=times, tokens_per_s=seq_len / step_s,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               host_gib=host() / 2**30, params_m=sum(p.numel() for p in model.parameters()) / 1e6)
    del model, optimizer
    return row


def slopes(specs, lengths, device, capacity_gib):
    rows, table = [], []
    for spec in specs:
        pair = []
        for n in lengths:
            row = one_row(spec, n, device)
            rows.append(row)
            print({k: v for k, v in row.items() if k != "losses"}, flush=True)
            _free()
            pair.append(row)
        if all(r["status"] == "ok" and r["peak_gib"] is not None for r in pair):
            (a, b) = pair
            per_token = (b["peak_gib"] - a["peak_gib"]) * 2**30 / (b["seq_len"] - a["seq_len"])
            intercept = a["peak_gib"] * 2**30 - per_token * a["seq_len"]
            longest = (capacity_gib * 2**30 - intercept) / per_token if per_token > 0 else float("inf")
            table.append(dict(spec=spec, peak_a=a["peak_gib"], peak_b=b["peak_gib"], bytes_per_token=per_token,
                              longest=longest, host_gib_b=b["host_gib"]))
        else:
            table.append(dict(spec=spec, status=[r["status"] for r in pair]))
    return rows, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="slopes,cost,longest")
    ap.add_argument("--slopes", default=",".join(SLOPES))
    ap.add_argument("--lengths", default="32768,65536")
    ap.add_argument("--cost", default=",".join(COST))
    ap.add_argument("--cost-len", type=int, default=131072)
    ap.add_argument("--longest", default=",".join(LONGEST), help="preset:vocab:option:tokens, comma-separated")
    ap.add_argument("--cost-steps", type=int, default=4, help="steps per cost row; the first is not timed")
    ap.add_argument("--longest-steps", type=int, default=2,
                    help="steps of each longest run (1: one whole step; its peak lacks AdamW's state, "
                         "allocated after backward)")
    ap.add_argument("--name", default="bench_memory", help="results file name (<out>/<name>.json)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, short sequences")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if args.dry_run:
        args.slopes, args.lengths = "tiny:259:full-logits,tiny:259:all", "256,512"
        args.cost, args.cost_len, args.longest = "tiny:259:full,tiny:259:all", 256, "tiny:1024:all-k2:1024"
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    capacity = torch.cuda.get_device_properties(0).total_memory / 2**30 if device.type == "cuda" else 0.0
    print(f"card: {card} ({capacity:.1f} GiB)  torch {torch.__version__}", flush=True)
    result = dict(card=card, capacity_gib=capacity, torch=torch.__version__)
    suites = args.suite.split(",")
    if "slopes" in suites:
        lengths = [int(n) for n in args.lengths.split(",")]
        result["slope_rows"], result["slopes"] = slopes(args.slopes.split(","), lengths, device, capacity)
    if "cost" in suites:
        result["cost"] = []
        for spec in args.cost.split(","):
            result["cost"].append(one_row(spec, args.cost_len, device, steps=args.cost_steps))
            print({k: v for k, v in result["cost"][-1].items() if k != "losses"}, flush=True)
            _free()
    if "longest" in suites:
        result["longest"] = []
        for spec in args.longest.split(","):
            n = int(spec.split(":")[3])
            result["longest"].append(one_row(spec, n, device, dilated=True, steps=args.longest_steps))
            print({k: v for k, v in result["longest"][-1].items() if k != "losses"}, flush=True)
            _free()
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n## {card}")
    for r in result.get("slopes", []):
        if "bytes_per_token" in r:
            print(f"| {r['spec']} | {r['peak_a']:.1f} | {r['peak_b']:.1f} | {r['bytes_per_token'] / 1e3:.0f} K | "
                  f"{r['longest'] / 2**10:.0f}K | host {r['host_gib_b']:.1f} |")
        else:
            print(f"| {r['spec']} | {r['status']} |")
    for r in result.get("cost", []):
        print(f"| cost {r['spec']} @ {r['seq_len']} | {r['status']} | "
              f"{r.get('tokens_per_s', 0):.0f} tok/s | {r.get('peak_gib') or 0:.1f} GiB |")
    for r in result.get("longest", []):
        print(f"| longest {r['spec']} | {r['status']} | {r.get('step_s', 0):.1f} s | "
              f"peak {r.get('peak_gib') or 0:.1f} GiB | host {r.get('host_gib', 0):.1f} GiB | losses {r.get('losses')} |")


if __name__ == "__main__":
    main()
