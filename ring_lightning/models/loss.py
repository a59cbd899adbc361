"""The LM head and the cross-entropy together, in token chunks: never the (T, V) logits.

With a real tokenizer (V = 128256) the logits of one 64K-token shard, their float32 copy
for the loss and their gradient take ~80 GB; everything else of a 350M model at that length
takes a few. ``linear_cross_entropy`` computes, chunk by chunk, the logits of a few
thousand tokens, their float32 log-sum-exp, the loss of each token and -- when a gradient
is wanted -- the gradients of that chunk's hidden states and of the head weight, then
drops the chunk's logits. The gradients are computed in the forward pass (the loss is a
scalar: backward only scales them by its incoming gradient), so nothing of size (T, V)
ever outlives its chunk.

It returns ``(loss_sum, num_tokens)``, the loss contract of ``LongDocumentLM.compute_loss``
and ``RingStrategy.reduce_token_loss``: sums, so however the sequence is split over ranks
(some holding no labelled token) the strategy still gives the one-device gradient.

Numerics: the same as ``F.cross_entropy(F.linear(h, W).float(), labels, reduction="sum")``:
each chunk's logits are computed in the matmul dtype autocast would use (bf16 under
``bf16-mixed``), then the softmax in float32; the gradient of the logits is cast back to
that dtype before its two matmuls, as autograd does for the plain head. Equal to 1e-6 in
float32 (tests/unit/models/test_loss.py).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ring_lightning.constants import IGNORE_INDEX

# Elements of one chunk's float32 logits: 2^30 (4 GiB; with the chunk's bf16 gradient ~6 GiB
# whatever the vocabulary: 8K tokens at V = 128256, the whole shard for a byte vocabulary).
# Smaller chunks cost speed: at 32K tokens of the 350m model, V = 128256, one H200, the plain
# head's step took 0.978 s, chunks of 2^27 1.028 s, 2^29 1.008 s, 2^30 1.002 s
# (benchmarks/results/2026-12-02-h200x1-reach/cost_loss_32k.json).
_CHUNK_ELEMENTS = 2**30


def default_chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so one chunk's float32 logits hold about 2^30 elements."""
    return max(256, _CHUNK_ELEMENTS // max(1, vocab_size))


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the head's matmul in (the input's when autocast is off)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """loss_sum = sum_t w_t * CE(pre_head(h_t) W^T, y_t); gradients made chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, token_weight, chunk_tokens, dtype, ignore_index, grad_mode,
                pre_head, *pre_params):
        # hidden (N, C), weight (V, C), labels (N,), token_weight (N,) float32. ``grad_mode``:
        # the caller's (forward always runs without grad), so validation makes no gradients.
        # ``pre_head``: a per-token module (the final norm) run on each chunk, its parameters
        # ``pre_params`` (inputs here, so autograd hands their gradients back through backward).
        need_h, need_w = grad_mode and ctx.needs_input_grad[0], grad_mode and ctx.needs_input_grad[1]
        need_p = [grad_mode and ctx.needs_input_grad[9 + i] for i in range(len(pre_params))]
        want_grad = need_h or need_w or any(need_p)
        w = weight.to(dtype)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_params = [torch.zeros_like(p, dtype=torch.float32) if n else None for p, n in zip(pre_params, need_p)]
        wanted = [p for p, n in zip(pre_params, need_p) if n]
        for start in range(0, hidden.shape[0], chunk_tokens):
            x = hidden[start:start + chunk_tokens]  # (n, C)
            if pre_head is not None:  # the norm's activations live for one chunk only
                with torch.set_grad_enabled(want_grad):
                    x = x.detach().requires_grad_(need_h)
                    normed = pre_head(x)  # (n, C)
            else:
                normed = x
            h = normed.detach().to(dtype)  # (n, C) in the matmul dtype
            y = labels[start:start + chunk_tokens]
            tw = token_weight[start:start + chunk_tokens]
            logits = (h @ w.t()).float()  # (n, V) float32: a bf16 softmax loses the small terms
            lse = torch.logsumexp(logits, dim=-1)  # (n,)
            valid = y != ignore_index
            target = logits.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)  # (n,)
            loss_sum += ((lse - target) * tw).masked_fill(~valid, 0.0).sum()
            if not want_grad:
                continue
            # d loss / d logits = w_t * (softmax - onehot(y)), 0 for ignored tokens.
            grad_logits = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            grad_logits.scatter_add_(1, y.clamp(min=0).unsqueeze(1),
                                     torch.full_like(lse, -1.0).unsqueeze(1))
            grad_logits.mul_((tw * valid).unsqueeze(1))
            grad_logits = grad_logits.to(dtype)  # (n, V): autograd casts it so for the plain head
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ h).float()
            grad_normed = (grad_logits @ w).to(normed.dtype) if (need_h or wanted) else None  # (n, C)
            del logits, grad_logits
            if grad_normed is None:
                continue
            if pre_head is None:
                grad_hidden[start:start + chunk_tokens] = grad_normed
                continue
            grads = torch.autograd.grad(normed, ([x] if need_h else []) + wanted, grad_normed)
            if need_h:
                grad_hidden[start:start + chunk_tokens] = grads[0]
                grads = grads[1:]
            for acc, g in zip([a for a in grad_params if a is not None], grads):
                acc += g.float()
        ctx.save_for_backward(grad_hidden, grad_weight, *grad_params)
        ctx.weight_dtype = weight.dtype
        ctx.param_dtypes = [p.dtype for p in pre_params]
        return loss_sum

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight, *grad_params = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        gp = [None if g is None else (g * grad_out).to(dt) for g, dt in zip(grad_params, ctx.param_dtypes)]
        return (gh, gw, None, None, None, None, None, None, None, *gp)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    loss_weight: Optional[torch.Tensor] = None,
    chunk_tokens: Optional[int] = None,
    pre_head: Optional[torch.nn.Module] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy of ``hidden @ weight.T`` without the logits.

    Args:
        hidden: (..., C) final hidden states of this rank's tokens: after the last norm, or
            before it when ``pre_head`` is that norm.
        weight: (V, C) the LM head's weight (``nn.Linear(C, V, bias=False).weight``).
        labels: (...) target ids aligned with ``hidden``; ``ignore_index`` where no loss.
        loss_weight: optional (...) per-token weights (e.g. a ``loss_mask``).
        chunk_tokens: tokens per chunk; default ``default_chunk_tokens(V)`` (~4 GiB of
            float32 logits per chunk).
        pre_head: optional per-token module run on each chunk before the head (the model's
            final norm): its activations then live for one chunk, not the whole shard (8
            bytes x C per token less at the peak); its parameters get their gradients.

    Returns:
        ``(loss_sum, num_tokens)``: float32 scalars; ``num_tokens`` counts labels
        ``!= ignore_index`` (times ``loss_weight`` when given) and may be 0 on a rank.

    Raises:
        ValueError: shapes that do not line up (named in the message).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and labels "
                         f"{tuple(labels.shape)} must share every dimension but the last")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: weight must be (vocab, {hidden.shape[-1]}), "
                         f"got {tuple(weight.shape)}")
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(weight.shape[0])
    if chunk_tokens < 1:
        raise ValueError(f"linear_cross_entropy: chunk_tokens must be >= 1, got {chunk_tokens}")
    flat_labels = labels.reshape(-1)
    valid = (flat_labels != ignore_index).float()
    token_weight = valid if loss_weight is None else valid * loss_weight.reshape(-1).float()
    loss_sum = _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat_labels,
                                         token_weight, int(chunk_tokens), _matmul_dtype(hidden),
                                         ignore_index, torch.is_grad_enabled(), pre_head,
                                         *(pre_head.parameters() if pre_head is not None else ()))
    return loss_sum, token_weight.sum()
