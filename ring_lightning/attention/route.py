"""The route of one attention call: an immutable description of the call, one pure choice.

``RingAttentionBase`` describes each call once (``AttentionCall``: shapes, dtype, device,
group size and rank, layout, head offset, the masks the variant declares, its execution
options) and ``choose_route`` alone decides how it is computed:

* ``HYBRID``: a Ulysses all-to-all group is active; the all-to-all runs around one ring call
  on a subset of heads (ulysses.py), which is described and routed again;
* ``SDPA``: one CUDA device, half precision, dense pattern, no mask, nothing that changes the
  computation: one fused ``scaled_dot_product_attention`` call (about 4% faster than the
  ring's general path at 128K tokens on one H200, benchmarks/bench_model.py);
* ``FLEX``: one CUDA device where FlexAttention runs, a dense pattern under masks
  (mask_protocol.py: packed documents, a block grid, a grid window): one FlexAttention call
  under their block mask (flex.py, grids.py);
* ``RING``: everything else: the ring (ring.py), each task's kernel chosen by the module's
  ``KernelPolicy`` (kernel_policy.py).

The choice reads nothing but the description, so it is tested as a table
(tests/unit/attention/test_route.py) without tensors or devices.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, FrozenSet, Mapping, Optional, Tuple

import torch

HALF = (torch.float16, torch.bfloat16)
#: RingContext options that change the computation itself (one fused call cannot honour them)
EXECUTION_OPTIONS = ("compute_dtype", "grad_check")


class Route(enum.Enum):
    HYBRID = "ulysses all-to-all around the ring"
    SDPA = "one device: fused scaled_dot_product_attention"
    FLEX = "one device: FlexAttention under a block mask"
    RING = "the ring, kernels per task"


@dataclass(frozen=True)
class AttentionCall:
    """What one attention call is, decided once per call (base.RingAttentionBase._describe)."""

    q_shape: Tuple[int, ...]  #: (B, T, H, D), this rank's
    k_shape: Tuple[int, ...]  #: (B, T, K, D)
    dtype: torch.dtype
    device_type: str  #: "cuda", "cpu", ...
    seq_len: int  #: the whole sequence's length
    world: int = 1  #: ranks of the ring's group (1: one device)
    rank: int = 0
    layout: str = "contiguous"
    already_split: bool = False
    is_causal: bool = False
    return_lse: bool = False
    head_offset: int = 0  #: global index of this call's first head (behind an all-to-all)
    hybrid: bool = False  #: a Ulysses all-to-all group is active around this call
    patterns: Tuple[Tuple[int, int], ...] = ()
    #: kinds (mask_protocol.MASKS) of the masks the call is under, causality apart: every registered
    #: kind has a FlexAttention mask_mod, so FLEX takes any of them
    masks: FrozenSet[str] = frozenset()
    kernel: str = "auto"  #: RingAttentionConfig.kernel
    dropout_active: bool = False  #: dropout > 0 in training mode
    flex_available: bool = False  #: torch.nn.attention.flex_attention imports here
    #: RingContext fields the variant asks for (path, tile, compute_dtype, grad_check)
    options: Mapping[str, Any] = field(default_factory=dict, compare=False)
    #: the ring's process group (None: one device)
    group: Optional[Any] = field(default=None, compare=False)
    #: the active shard context behind a HYBRID call (sharding.SequenceSharding)
    sharding: Optional[Any] = field(default=None, compare=False)

    @property
    def dense(self) -> bool:
        return self.patterns == ((self.seq_len, 1),)

    @property
    def execution_options(self) -> FrozenSet[str]:
        return frozenset(self.options) & frozenset(EXECUTION_OPTIONS)


def _one_device_fast(call: AttentionCall) -> bool:
    """One CUDA device in half precision, the whole call one kernel call: a dense pattern, the
    automatic kernel, no dropout, no log-sum-exp asked for, nothing that changes the computation."""
    return (call.world == 1 and not call.return_lse and call.device_type == "cuda" and call.dtype in HALF
            and call.kernel == "auto" and call.dense and not call.dropout_active
            and not call.execution_options)


def choose_route(call: AttentionCall) -> Route:
    """How ``call`` is computed (module docstring). Pure: reads ``call`` only."""
    if call.hybrid:
        return Route.HYBRID
    if _one_device_fast(call):
        if not call.masks:
            return Route.SDPA
        if call.flex_available and call.q_shape[-1] >= 16:
            return Route.FLEX
    return Route.RING
