"""Masks at kernel speed, one GPU, one run with the peers (issue: packed documents,
block_sparse, hilbert).

    python benchmarks/bench_masks.py                 # one GPU
    python benchmarks/bench_masks.py --only grids,balance --out-name bench_grids   # token grids only
    python benchmarks/bench_masks.py --dry-run       # CPU smoke test (tiny sizes)

Causal bf16 self-attention, B=1, H=32, D=128, forward + backward (``autograd.grad`` of the
output), no process group. Rows at each N:

  sdpa-cudnn             F.scaled_dot_product_attention, cuDNN backend, dense causal
  standard / hilbert     ring_lightning dense, and LongNet-dilated (segments N/8, N/2, N;
                         rates 1, 2, 4)
  block_sparse <ratio>   ring_lightning block_sparse local_window (block 128) at kept ratios,
                         against flex-block <ratio>: compiled FlexAttention with the SAME
                         block mask (the module's block_mask(N) AND causal)
  docs <path>            packed documents (lengths ~ exponential, mean 8K), causal: the
                         default path (FlexAttention under a document block mask; "new
                         ids/step" builds that mask in every step, as training does),
                         the ring's per-task varlen path (kernel="flash"), and flex-docs, a
                         compiled FlexAttention call with the same document mask
  grids ...              token grids (64K patches, box windows), hilbert vs raster order, against
                         FlexAttention with the same window (benchmarks/mask_grids.py)
  balance ...            causal packed documents: exact work per rank, sp = 2, 4, 8, per layout
                         (a separate table: counts, no timing)

Validation: every ring_lightning row's output and gradients against its peer (SDPA for
dense, FlexAttention for masks, standard for hilbert) from the same inputs, relative L2
error < 2e-2. TFLOP/s count allowed pairs only (``ring_lightning.models.flops``: causal m^2/2 per
head and block of m mutually visible tokens; documents: sum of L^2/2 per document),
forward 4*D*P, backward 2.5x. ms = median of CUDA-event timings after a warm-up call
(compilation and mask building happen there and are reported as first_call_s).
Writes $OUT/bench_masks.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _common import env_info, import_engine, rel_err, short_error, write_table
from mask_grids import balance_rows, balance_table, document_lengths, grid_rows

attention, flops = import_engine("attention", "models.flops")
# the rows of the loop over --ns: skipped as a whole when --only names none of them
NS_ROWS = ("sdpa-cudnn", "standard dense", "hilbert dense", "standard dilated", "hilbert dilated", "flex-block",
           "block_sparse", "flex-docs", "docs default (flex)", "docs default, new ids/step", "docs ring varlen",
           "docs hilbert")


def timed(step, repeats: int, cuda: bool):
    t0 = time.perf_counter()
    result = step()
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    graphs = _graphs()
    times = []
    for _ in range(repeats):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); step(); b.record(); b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter(); step(); times.append((time.perf_counter() - t) * 1e3)
    return result, first, statistics.median(times), _graphs() - graphs


def _graphs() -> int:
    """Graphs torch.compile has built so far: any built while timing is a recompilation."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def doc_ids(n: int, mean: int, device, seed: int = 0) -> torch.Tensor:
    lengths = document_lengths(n, mean, seed=seed)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return ids.unsqueeze(0).to(device)  # (1, N)


def doc_pairs(ids: torch.Tensor, heads: int) -> float:
    counts = torch.unique_consecutive(ids[0], return_counts=True)[1].double()
    return heads * float((counts ** 2 / 2).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--ns", default="32768,131072")
    ap.add_argument("--ratios", default="0.05,0.1,0.25,0.5")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=400)
    ap.add_argument("--only", default="", help="comma-separated substrings: run only rows whose name has one")
    ap.add_argument("--out-name", default="bench_masks", help="files written: $OUT/<out-name>.{json,md}")
    args = ap.parse_args()
    only = [part for part in args.only.split(",") if part]

    def wanted(name: str) -> bool:
        return not only or any(part in name for part in only)

    cuda = torch.cuda.is_available() and not args.dry_run
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    H, D = (32, 128) if cuda else (4, 16)
    ns = [int(x) for x in args.ns.split(",")] if cuda else [1024]
    ratios = [float(x) for x in args.ratios.split(",")]
    bs, mean_doc = (128, 8192) if cuda else (64, 128)
    reps = args.repeats if cuda else 1
    t_start, rows = time.monotonic(), []

    def row(name, n, step, pairs, peer=None, **extra):
        rec = dict(name=name, n=n, **extra)
        if not wanted(name):
            return None
        if time.monotonic() - t_start > args.budget_s:
            rec["error"] = "skipped: time budget"
        else:
            try:
                result, first, ms, recompiled = timed(step, reps, cuda)
                rec.update(ms=ms, first_call_s=round(first, 3), tflops=flops.flops_from_pairs(pairs, D) / ms / 1e9,
                           graphs_built_while_timing=recompiled)
                if peer is not None:
                    rec["err_vs_peer"] = max(rel_err(a, b) for a, b in zip(result, peer))
                    rec["valid"] = rec["err_vs_peer"] < 2e-2
                rec["_result"] = result
            except Exception as exc:  # noqa: BLE001 - record and go on
                rec["error"] = short_error(exc)
        rows.append(rec)
        print(f"{name:30s} N={n:7d} {rec.get('ms', rec.get('error'))} "
              f"(graphs built while timing: {rec.get('graphs_built_while_timing')})", flush=True)
        return rec.get("_result")

    for n in ns if any(wanted(name) for name in NS_ROWS) else ():
        g = torch.Generator().manual_seed(0)
        q, k, v, dout = (torch.randn(1, n, H, D, generator=g).to(dev, dtype) for _ in range(4))
        q, k, v = (x.requires_grad_() for x in (q, k, v))

        def grads(out):
            return (out.detach(), *torch.autograd.grad(out, (q, k, v), dout))

        def sdpa():
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backend = SDPBackend.CUDNN_ATTENTION if cuda else SDPBackend.MATH
            with sdpa_kernel([backend]):
                out = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
            return grads(out)

        def ring(variant, document_ids=None, **fields):
            attn = attention.create_ring_attention(variant, **fields)
            return lambda: grads(attn(q, k, v, is_causal=True, already_split=True, document_ids=document_ids))

        dense_pairs = flops.attention_pairs(n, H, causal=True)
        ref = row("sdpa-cudnn", n, sdpa, dense_pairs)
        std = row("standard dense", n, ring("standard"), dense_pairs, ref)
        row("hilbert dense", n, ring("hilbert"), dense_pairs, ref)
        dil = dict(segment_lengths=[n // 8, n // 2, n], dilation_rates=[1, 2, 4])
        dil_pairs = flops.attention_pairs(n, H, causal=True, **dil)
        std_dil = row("standard dilated", n, ring("standard", **dil), dil_pairs)
        row("hilbert dilated", n, ring("hilbert", **dil), dil_pairs, std_dil)
        del std, std_dil

        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False) if cuda else flex_attention

        def flex_step(mask_mod):
            mask = create_block_mask(mask_mod, None, None, n, n, device=dev, _compile=cuda)
            return lambda: grads(flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      block_mask=mask).transpose(1, 2))

        for r in ratios:
            fields = dict(block_size=bs, sparsity_ratio=r, sparse_pattern="local_window")
            blocks = attention.create_ring_attention("block_sparse", **fields).block_mask(n).to(dev)
            pairs = flops.attention_pairs(n, H, causal=True, block_mask=blocks.cpu(), block_size=bs)
            kept = float(blocks.tril().float().sum() / (blocks.shape[0] * (blocks.shape[0] + 1) / 2))
            peer = row(f"flex-block {r}", n, flex_step(
                lambda b, h, qi, ki: (ki <= qi) & blocks[qi // bs, ki // bs]), pairs, kept_causal_blocks=kept)
            row(f"block_sparse {r}", n, ring("block_sparse", **fields), pairs, peer, kept_causal_blocks=kept)
            del peer

        ids = doc_ids(n, mean_doc, dev)
        pairs = doc_pairs(ids, H)
        peer = row("flex-docs", n, flex_step(lambda b, h, qi, ki: (ki <= qi) & (ids[0, qi] == ids[0, ki])), pairs,
                   documents=int(ids.max()) + 1)
        row("docs default (flex)", n, ring("standard", document_ids=ids), pairs, peer)
        fresh = attention.create_ring_attention("standard")  # a new batch each step: its mask is built each step
        row("docs default, new ids/step", n, lambda: grads(fresh(q, k, v, is_causal=True, already_split=True,
                                                                  document_ids=ids.clone())), pairs, peer)
        row("docs ring varlen", n, ring("standard", document_ids=ids, kernel="flash"), pairs, peer)
        row("docs hilbert", n, ring("hilbert", document_ids=ids), pairs, peer)
        del peer, q, k, v, dout
        if cuda:
            torch.cuda.empty_cache()

    grid_rows(row, wanted, cuda, dev, dtype, H, D)
    balance = [r for r in balance_rows(cuda) if wanted(r["name"])]
    for r in rows:
        r.pop("_result", None)
    by = {(r["name"], r["n"]): r for r in rows}
    peers = {"standard dense": "sdpa-cudnn", "hilbert dense": "standard dense",
             "hilbert dilated": "standard dilated", "docs default (flex)": "flex-docs",
             "docs default, new ids/step": "flex-docs",
             "docs ring varlen": "flex-docs", "docs hilbert": "flex-docs"}
    for r in rows:
        peer = peers.get(r["name"]) or (r["name"].replace("block_sparse", "flex-block")
                                        if r["name"].startswith("block_sparse") else None)
        if r["name"].startswith("grids") and not r["name"].endswith(("flex raster", "sdpa dense")):
            peer = r["name"].rsplit(" ", 1)[0] + " flex raster"
        p = by.get((peer, r["n"]))
        if peer and p and "ms" in p and "ms" in r:
            r["peer"], r["speed_vs_peer"] = peer, p["ms"] / r["ms"]
    device = env_info(dev).get("device_name", dev.type)
    lines = [f"# Masks at kernel speed: {device}, {dtype}, B=1 H={H} D={D}, fwd+bwd (causal; grids: not)", "",
             "| row | N | ms | TFLOP/s (allowed pairs) | peer | speed / peer | err vs peer | kept blocks | "
             "first call s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['n']} | {round(r['ms'], 2) if 'ms' in r else r.get('error')} | "
                     f"{round(r['tflops'], 1) if 'tflops' in r else '-'} | {r.get('peer', '-')} | "
                     f"{round(r['speed_vs_peer'], 3) if 'speed_vs_peer' in r else '-'} | "
                     f"{'%.2g' % r['err_vs_peer'] if 'err_vs_peer' in r else '-'} | "
                     f"{r.get('kept_blocks', r.get('kept_causal_blocks', '-'))} | {r.get('first_call_s', '-')} |")
    if balance:
        lines += balance_table(balance)
    write_table(args.out_name, "\n".join(lines), dev, rows + balance)


if __name__ == "__main__":
    main()
