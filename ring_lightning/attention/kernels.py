"""Local block attention that returns the log-sum-exp, forward and backward.

One call computes attention of a query block against one key block, either with no mask
("full") or with a top-left aligned lower-triangular mask ("causal": the two blocks hold
the same positions), optionally intersected with a token mask (block-sparse). It returns
``(out, lse)`` so the ring can merge it, and its backward takes the FINAL merged ``out``
and ``lse`` -- the standard flash-attention backward identity:

    P = exp(S - lse_final),  dS = P * (dO @ V^T - rowsum(dO * O_final))

which is exact for any split of the keys into blocks.

Two implementations:
* ``math``: portable PyTorch, tiled so that it never holds more than one
  ``tile x tile`` block of scores; skips tiles with nothing allowed; supports dropout
  through a per-tile seeded mask that backward regenerates. Used on CPU, for float32/64
  and wherever a CUDA kernel does not apply.
* CUDA SDPA kernels (cuDNN, flash, memory-efficient) through their ATen ops, which return
  the log-sum-exp. Which one takes a block, and what each refused so far, is the
  module's ``KernelPolicy`` (kernel_policy.py).

Letters: B' batch (batch x segments), M query tokens, L key tokens, H heads, D head dim.
Tensors arrive as (B', M, H, D); lse is (B', M, H).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from . import varlen
from .kernel_policy import KernelPolicy
from .merge import accumulator_dtype


@dataclass
class BlockSpec:
    """How one query block attends to one key block."""

    causal: bool = False  #: top-left aligned lower-triangular (same positions on both sides)
    #: optional mask, True = allowed: a (M, L) / (B', 1, M, L) bool tensor, or a function
    #: (q0, q1, k0, k1) -> the mask of that tile (so no M x L mask is ever materialised)
    token_mask: Optional[Any] = None
    dropout_p: float = 0.0
    dropout_seed: int = 0  #: per-task seed; tiles derive their own from it
    #: packed documents: the task's ids (documents.DocumentTask); a query sees its own document only
    documents: Optional[Any] = None
    #: (query tiles, key tiles) -> the (i, j) tiles in the order the portable kernel visits them
    tile_order: Optional[Callable[[int, int], Any]] = None


def _tile_dropout(spec: BlockSpec, qi: int, ki: int, shape, device) -> torch.Tensor:
    # Seeded per (task, tile) so backward regenerates exactly the forward's mask.
    gen = torch.Generator(device=device)
    gen.manual_seed((spec.dropout_seed * 1_000_003 + qi * 7919 + ki) % (2**63 - 1))
    keep = torch.rand(shape, generator=gen, device=device) >= spec.dropout_p
    return keep


def _tile_mask(spec: BlockSpec, q0: int, q1: int, k0: int, k1: int, device):
    """None = all allowed; False = nothing allowed (skip); else (mq, mk) bool."""
    mask = None
    if spec.causal:
        if k0 > q1 - 1:
            return False
        if k1 - 1 > q0:  # the tile crosses the diagonal
            qi = torch.arange(q0, q1, device=device)
            ki = torch.arange(k0, k1, device=device)
            mask = ki[None, :] <= qi[:, None]
    if spec.documents is not None:
        dm = spec.documents.allowed(q0, q1, k0, k1)  # (B', 1, mq, mk)
        if not bool(dm.any()):
            return False
        mask = dm if mask is None else (mask & dm)
    if spec.token_mask is not None:
        if callable(spec.token_mask):
            tm = spec.token_mask(q0, q1, k0, k1)
        else:
            tm = spec.token_mask[..., q0:q1, k0:k1]
        if not bool(tm.any()):
            return False
        mask = tm if mask is None else (mask & tm)
    return mask


def _heads_first(dtype: torch.dtype, *xs: torch.Tensor):
    """(B', M, H, D) tensors -> (B', H, M, D) views in ``dtype``: one matmul batch per head."""
    return tuple(x.to(dtype).transpose(1, 2) for x in xs)


def _tiles(spec: BlockSpec, M: int, L: int, tile: int):
    """(q0, q1, k0, k1) of every tile, in the spec's schedule (row-major unless it has one)."""
    nq, nk = -(-M // tile), -(-L // tile)
    pairs = spec.tile_order(nq, nk) if spec.tile_order is not None else (
        (i, j) for i in range(nq) for j in range(nk))
    for i, j in pairs:
        yield i * tile, min((i + 1) * tile, M), j * tile, min((j + 1) * tile, L)


def math_forward(q, k, v, scale: float, spec: BlockSpec, tile: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Tiled online-softmax forward. Returns out (B',M,H,D), lse (B',M,H) and tiles skipped.

    Running max / sum / output are kept for every query row, so tiles may come in any order
    (the hilbert variant's schedule); the result does not depend on it beyond rounding.
    """
    acc = accumulator_dtype(q.dtype)
    Bp, M, H, D = q.shape
    qf, kf, vf = _heads_first(acc, q, k, v)  # (B', H, M, D), (B', H, L, D) x2
    row_max = torch.full((Bp, H, M), float("-inf"), dtype=acc, device=q.device)
    row_sum = torch.zeros((Bp, H, M), dtype=acc, device=q.device)
    row_out = torch.zeros((Bp, H, M, D), dtype=acc, device=q.device)
    skipped = 0
    for q0, q1, k0, k1 in _tiles(spec, M, k.shape[1], tile):
        mask = _tile_mask(spec, q0, q1, k0, k1, q.device)
        if mask is False:
            skipped += 1
            continue
        s = torch.matmul(qf[:, :, q0:q1], kf[:, :, k0:k1].transpose(-1, -2)) * scale  # (B',H,mq,mk)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        old_max = row_max[:, :, q0:q1]
        new_max = torch.maximum(old_max, s.amax(-1))
        safe_max = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)
        p = torch.exp(s - safe_max[..., None])
        correction = torch.exp(old_max - safe_max)
        row_sum[:, :, q0:q1] = row_sum[:, :, q0:q1] * correction + p.sum(-1)
        if spec.dropout_p > 0:
            keep = _tile_dropout(spec, q0, k0, p.shape, q.device)
            p = p * keep / (1.0 - spec.dropout_p)
        row_out[:, :, q0:q1] = row_out[:, :, q0:q1] * correction[..., None] + torch.matmul(p, vf[:, :, k0:k1])
        row_max[:, :, q0:q1] = new_max
    safe_max = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
    has_key = row_sum > 0
    lse = torch.where(has_key, safe_max + torch.log(row_sum), torch.full_like(row_sum, float("-inf")))
    out = torch.where(has_key[..., None], row_out / row_sum.clamp_min(1e-300)[..., None], 0.0)
    return out.transpose(1, 2), lse.transpose(1, 2), skipped


def math_backward(q, k, v, out, dout, lse, scale: float, spec: BlockSpec, tile: int):
    """Gradients of one block given the FINAL merged out (B',M,H,D) and lse (B',M,H)."""
    acc = accumulator_dtype(q.dtype)
    qf, kf, vf, do = _heads_first(acc, q, k, v, dout)  # (B', H, M|L, D)
    lse_t = lse.to(acc).transpose(1, 2)  # (B', H, M)
    lse_t = torch.where(torch.isneginf(lse_t), torch.zeros_like(lse_t), lse_t)
    delta = (do * out.to(acc).transpose(1, 2)).sum(-1)  # (B', H, M)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for q0, q1, k0, k1 in _tiles(spec, qf.shape[2], kf.shape[2], tile):
        mask = _tile_mask(spec, q0, q1, k0, k1, q.device)
        if mask is False:
            continue
        s = torch.matmul(qf[:, :, q0:q1], kf[:, :, k0:k1].transpose(-1, -2)) * scale
        p = torch.exp(s - lse_t[:, :, q0:q1, None])
        if mask is not None:
            p = torch.where(mask, p, torch.zeros_like(p))
        dp = torch.matmul(do[:, :, q0:q1], vf[:, :, k0:k1].transpose(-1, -2))
        if spec.dropout_p > 0:
            keep = _tile_dropout(spec, q0, k0, p.shape, q.device) / (1.0 - spec.dropout_p)
            dv[:, :, k0:k1] += torch.matmul((p * keep).transpose(-1, -2), do[:, :, q0:q1])
            dp = dp * keep
        else:
            dv[:, :, k0:k1] += torch.matmul(p.transpose(-1, -2), do[:, :, q0:q1])
        ds = p * (dp - delta[:, :, q0:q1, None])
        dq[:, :, q0:q1] += torch.matmul(ds, kf[:, :, k0:k1]) * scale
        dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qf[:, :, q0:q1]) * scale
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ----------------------------------------------------------------------------- CUDA kernels
def _documents_forward(q, k, v, scale: float, spec: BlockSpec):
    cu_q, cu_k, max_q, max_k, key_counts = spec.documents.sequences()
    Bp, M, H, D = q.shape
    o, l, state = varlen.varlen_forward(q.reshape(Bp * M, H, D), k.reshape(-1, H, D), v.reshape(-1, H, D),
                                        cu_q, cu_k, max_q, max_k, scale, spec.causal, key_counts)
    return o.view(Bp, M, H, D), l.view(Bp, M, H), state



def _cuda_forward(name: str, q, k, v, scale: float, causal: bool):
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # (B', H, M, D) views
    if name == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        saved = ("flash", res[2], res[3], res[4], res[5], res[6], res[7])
    elif name == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, True, 0.0, causal, False, scale=scale)
        out, lse = res[0], res[1]
        saved = ("cudnn", res[2], res[3], res[4], res[5], res[6], res[7], tuple(res[1].shape))
    else:
        res = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, 0.0, causal, scale=scale)
        out, lse = res[0], res[1]
        saved = ("efficient", res[2], res[3], res[1].shape[-1])
    lse = lse.reshape(lse.shape[0], lse.shape[1], -1)[:, :, : q.shape[1]]  # (B', H, M)
    return out.transpose(1, 2), lse.transpose(1, 2), saved


def _cuda_backward(saved, q, k, v, out, dout, lse, scale: float, causal: bool):
    qt, kt, vt, ot, dot = (x.transpose(1, 2) for x in (q, k, v, out, dout))
    lse_t = lse.transpose(1, 2).contiguous()  # (B', H, M)
    name = saved[0]
    if name == "flash":
        _, cq, ck, mq, mk, seed, offset = saved
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dot, qt, kt, vt, ot, lse_t, cq, ck, mq, mk, 0.0, causal, seed, offset, scale=scale)
    elif name == "cudnn":
        _, cq, ck, mq, mk, seed, offset, lse_shape = saved
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dot, qt, kt, vt, ot, lse_t.reshape(lse_shape), seed, offset, None,
            cq, ck, mq, mk, 0.0, causal, scale=scale)
    else:
        _, seed, offset, padded = saved
        if padded > lse_t.shape[-1]:  # the kernel stores lse padded to a multiple of 32 rows
            lse_t = torch.nn.functional.pad(lse_t, (0, padded - lse_t.shape[-1]))
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            dot, qt, kt, vt, None, ot, lse_t, seed, offset, 0.0,
            [True, True, True, False], causal, scale=scale)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def block_forward(q, k, v, scale: float, spec: BlockSpec, policy: KernelPolicy, tile: int = 1024):
    """(out, lse, saved, skipped_tiles) for one block. q (B',M,H,D); k, v (B',L,H,D).

    ``policy`` (the module's) picks the kernel: varlen for packed documents, the CUDA
    kernels it allows, else the portable math kernel."""
    if policy.documents_varlen(q, spec):
        result = policy.try_varlen(lambda: _documents_forward(q, k, v, scale, spec), "packed documents")
        if result is not None:
            return (*result, 0)
    for name in policy.cuda_candidates(q, spec):
        try:
            out, lse, saved = _cuda_forward(name, q, k, v, scale, spec.causal)
            return out, lse, saved, 0
        except torch.OutOfMemoryError:
            raise  # not a refusal: the math kernel would not fit either
        except RuntimeError as exc:
            # the kernel rejects this signature (head dim, alignment, arch): the next one takes it
            policy.refuse(name, q, exc)
    out, lse, skipped = math_forward(q, k, v, scale, spec, tile)
    return out, lse, ("math",), skipped


def block_backward(saved, q, k, v, out, dout, lse, scale: float, spec: BlockSpec, tile: int = 1024):
    """(dq, dk, dv) of one block, given the final merged out and lse."""
    if saved[0] == "varlen":
        Bp, M = q.shape[:2]
        flat = [x.flatten(0, 1) for x in (q, k, v, out.to(q.dtype), dout.to(q.dtype), lse)]  # (B'*M|L, ...)
        dq, dk, dv = varlen.varlen_backward(saved, *flat, scale)
        return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
    if saved[0] != "math":
        return _cuda_backward(saved, q, k, v, out.to(q.dtype), dout.to(q.dtype), lse, scale, spec.causal)
    return math_backward(q, k, v, out, dout, lse, scale, spec, tile)
