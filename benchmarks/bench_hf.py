"""A Hugging Face Llama of our 350m shapes trained through HFCausalLM on one GPU, vs the same model on sdpa.

    python benchmarks/bench_hf.py                              # 350m shapes, 128K tokens, one GPU
    python benchmarks/bench_hf.py --seq-len 32768 --steps 5
    python benchmarks/bench_hf.py --dry-run                    # CPU smoke test (tiny model, 256 tokens)

The model is ``transformers.LlamaForCausalLM`` with ``ring_lightning.models.model_config.PRESETS["350m"]``'s
shapes (dim 1024, 24 layers, 16 heads / 8 kv heads, SwiGLU 3584, rope theta 5e5; the byte
vocabulary), randomly initialised once; both rows train the same weights on the same tokens:

* ``ring_lightning``: ``HFCausalLM``'s step (``attn_implementation="ring_lightning"``, global
  positions, labels as ``shift_labels``); on one GPU the ring core takes its single-device path
  (the fused SDPA kernel for a dense causal pattern, FlexAttention with ``--documents``);
* ``sdpa``: the same model after ``set_attn_implementation("sdpa")``, transformers' own path.

One step: bf16 autocast, the model's loss (float32 logits), backward, clip_grad_norm_(1.0), AdamW
(foreach). Activation checkpointing through the model's own mechanism (``--checkpointing full``
by default: 128K tokens of 24 layers do not fit otherwise). Timed over ``--steps`` after
``--warmup``; peak memory is ``torch.cuda.max_memory_allocated`` of each row. Prints a table and
the step-1 losses (equal to bf16 rounding: the same computation), writes JSON to ``--json``.

Through the Trainer, the same model trains with
``python train.py model=hf 'model.config={model_type: llama, ...}' data.seq_len=131072`` (the
command is printed with the table).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ring_lightning.hf import HFCausalLM  # noqa: E402
from ring_lightning.models.model_config import PRESETS, ModelConfig  # noqa: E402


def llama_fields(preset: str, seq_len: int) -> dict:
    """transformers LlamaConfig fields with our preset's shapes."""
    cfg = ModelConfig.preset(preset)
    return {"model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
            "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": seq_len,
            "tie_word_embeddings": False}


def run_row(module: HFCausalLM, attention: str, batch: dict, steps: int, warmup: int, device) -> dict:
    cuda = device.type == "cuda"
    module.model.set_attn_implementation(attention)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5, foreach=True)
    inputs = module.model_inputs(batch)
    losses = []

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = module(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = sorted(times)[len(times) // 2]
    tokens = batch["input_ids"].numel()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del optimizer
    return {"attention": attention, "seq_len": batch["input_ids"].shape[1], "step_s": median,
            "tokens_per_s": tokens / median, "peak_gib": peak, "first_loss": losses[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="350m", choices=sorted(PRESETS))
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--checkpointing", default="full", choices=["none", "full", "offload"])
    ap.add_argument("--documents", type=int, default=0, help="also a ring_lightning row with N packed documents")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "bench_out"), "bench_hf.json"))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 256 tokens")
    args = ap.parse_args()
    if args.dry_run:
        args.preset, args.seq_len, args.steps, args.warmup = "tiny", 256, 2, 1
        args.checkpointing = "full" if args.checkpointing == "offload" else args.checkpointing  # offload: CUDA
    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    torch.manual_seed(0)
    fields = llama_fields(args.preset, args.seq_len)
    module = HFCausalLM(config=fields, checkpointing=args.checkpointing).to(device)
    module.train()
    initial = {k: v.detach().clone() for k, v in module.state_dict().items()}  # every row starts from these
    ids = torch.randint(0, fields["vocab_size"], (1, args.seq_len + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    rows = [run_row(module, "ring_lightning", batch, args.steps, args.warmup, device)]
    module.load_state_dict(initial)
    rows.append(run_row(module, "sdpa", batch, args.steps, args.warmup, device))
    if args.documents:
        cuts = torch.linspace(0, args.seq_len, args.documents + 1, device=device)[1:-1].long()
        docs = torch.zeros(1, args.seq_len, dtype=torch.long, device=device)
        for c in cuts.tolist():
            docs[:, c:] += 1
        module.load_state_dict(initial)
        row = run_row(module, "ring_lightning", {**batch, "document_ids": docs}, args.steps, args.warmup, device)
        rows.append({**row, "attention": f"ring_lightning+{args.documents}docs"})
    params = sum(p.numel() for p in module.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"\nHF Llama, {args.preset} shapes ({params / 1e6:.1f}M parameters), {args.seq_len} tokens, "
          f"checkpointing={args.checkpointing}, {name}, torch {torch.__version__}")
    print("| attention | tokens | step s | tokens/s | peak GiB | first loss |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['attention']} | {r['seq_len']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_gib']:.1f} | {r['first_loss']:.4f} |")
    print(f"ring_lightning / sdpa tokens/s: {rows[0]['tokens_per_s'] / rows[1]['tokens_per_s']:.3f}")
    config = "{" + ", ".join(f"{k}: {v}" for k, v in fields.items()) + "}"
    print(f"through the Trainer: python train.py experiment=base_gpu model=hf 'model.config={config}' "
          f"model.checkpointing={args.checkpointing} data.seq_len={args.seq_len} data.batch_size=1")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"preset": args.preset, "device": name, "parameters": params, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
