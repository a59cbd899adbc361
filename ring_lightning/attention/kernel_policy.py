"""KernelPolicy: which kernel computes one ring task, and what each kernel refused so far.

The one place of the per-task kernel choice (kernels.block_forward and the block-sparse
gathered kernel ask it): packed documents try FlashAttention's varlen kernel, dense tasks
the CUDA SDPA kernels (cuDNN, flash, memory-efficient, in that order, or the one
``RingAttentionConfig.kernel`` names), everything else the portable math kernel.

A kernel that refuses an input (dtype, head dim, architecture) is remembered, so later
tasks of the same signature go to the next kernel at once. The memory belongs to one
attention module (``RingAttentionBase.kernels``), not to the process: two modules, or one
benchmark row and the next, do not change each other's choices.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Set, Tuple

import torch

CUDA_KERNELS = ("cudnn", "flash", "efficient")


class KernelPolicy:
    """The kernel order of one module (``kernel``: a RingAttentionConfig.kernel value) and its refusals."""

    def __init__(self, kernel: str = "auto") -> None:
        self.kernel = kernel
        self.refused: Set[Tuple[str, tuple]] = set()  #: (kernel, (dtype, head_dim)) a CUDA kernel rejected
        self.varlen_refusal: Optional[str] = None  #: the varlen kernel's error, once refused

    # ------------------------------------------------------------------ dense tasks
    def cuda_candidates(self, q: torch.Tensor, spec) -> Tuple[str, ...]:
        """CUDA kernels that may take this block (a kernels.BlockSpec), in order of preference."""
        if not q.is_cuda or spec.token_mask is not None or spec.dropout_p > 0 or spec.documents is not None:
            return ()
        if q.dtype not in (torch.float16, torch.bfloat16):
            return ()
        names = CUDA_KERNELS if self.kernel == "auto" else ((self.kernel,) if self.kernel in CUDA_KERNELS else ())
        key = (q.dtype, q.shape[-1])
        return tuple(n for n in names if (n, key) not in self.refused)

    def refuse(self, name: str, q: torch.Tensor, exc: Exception) -> None:
        """``name`` rejected this signature: the next kernel takes it from now on."""
        self.refused.add((name, (q.dtype, q.shape[-1])))
        if self.kernel != "auto":
            warnings.warn(f"kernel={self.kernel!r} refused {q.dtype} head_dim={q.shape[-1]} ({exc}); "
                          f"using the portable math kernel", RuntimeWarning)

    # ---------------------------------------------------------------- varlen tasks
    def varlen_ok(self, q: torch.Tensor) -> bool:
        """FlashAttention's varlen kernel can take q (and has not refused before)."""
        return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
                and q.shape[-1] % 8 == 0 and self.varlen_refusal is None)

    def documents_varlen(self, q: torch.Tensor, spec) -> bool:
        """Packed documents on CUDA: one varlen call, one sequence per document."""
        return (spec.documents is not None and spec.documents.packed and spec.token_mask is None
                and spec.dropout_p == 0 and self.kernel in ("auto", "flash") and self.varlen_ok(q))

    def try_varlen(self, call: Callable[[], tuple], user: str):
        """``call()``, or None when the varlen kernel refuses the input: remembered (later calls
        go portable at once) and said once, naming the ``user``."""
        try:
            return call()
        except torch.OutOfMemoryError:
            raise  # not a refusal: the portable kernel would not fit either
        except RuntimeError as exc:
            self.varlen_refusal = repr(exc)
            warnings.warn(f"FlashAttention varlen refused ({exc!r}); {user} falls back to the portable "
                          f"kernel, which is much slower", RuntimeWarning)
            return None

    def refusals(self) -> list:
        """What was refused so far, as text (benchmarks report it)."""
        out = sorted(f"{name} {dtype} head_dim={d}" for name, (dtype, d) in self.refused)
        return out + ([f"varlen {self.varlen_refusal}"] if self.varlen_refusal else [])
