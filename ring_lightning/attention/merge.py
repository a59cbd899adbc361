"""The log-sum-exp merge: the one numerically delicate step of ring attention.

Every partial result -- one dilation pattern, one key chunk, one ring step -- is a pair
``(out, lse)``: the softmax-normalised output over the keys it saw and the log of its
softmax denominator. Two partials over disjoint key sets combine exactly:

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

The operation is associative and commutative, so a single float32 accumulator per query
absorbs partials in any order. It is also the LongNet merge of dilation patterns, whose
weights are proportional to each pattern's denominator (docs/ARCHITECTURE.md, the merge).

Float32 (or float64 when inputs are float64) because the weights are exponentials of
differences: in bf16 the rounding of ``exp`` would grow with the number of merges, i.e.
with the ring size. A row that has seen no key has ``lse = -inf`` and ``out = 0``; the
merge keeps it finite (no ``-inf - -inf = NaN``).

Shapes: out (..., H, D), lse (..., H) -- any leading dims, lse without the head_dim.
"""

from __future__ import annotations

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge the partial ``(out, lse)`` into the accumulator ``(acc_out, acc_lse)`` in place.

    ``acc_out``/``acc_lse`` may be strided views into a larger accumulator (the ring writes
    dilated selections through views). ``out``/``lse`` are converted to the accumulator dtype.
    """
    out = out.to(acc_out.dtype)
    lse = lse.to(acc_lse.dtype)
    new_lse = torch.logaddexp(acc_lse, lse)
    # Where both sides are empty, new_lse is -inf; subtract 0 there instead so the
    # weights come out as exp(-inf) = 0 rather than NaN.
    shift = torch.where(torch.isneginf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(acc_lse - shift).unsqueeze(-1)
    w_new = torch.exp(lse - shift).unsqueeze(-1)
    # torch.where, not a product, for the new side: a kernel may leave garbage in rows
    # it never wrote (weight 0), and 0 * NaN would poison the accumulator.
    merged = acc_out * w_old + torch.where(w_new > 0, out * w_new, torch.zeros_like(out))
    acc_out.copy_(merged)
    acc_lse.copy_(new_lse)
