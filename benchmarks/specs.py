"""What a row of ``bench_attention.py`` is: its name, implementation, pattern, and its work.

A row name (``--impls``) maps to a ``Spec``: ``sdpa-<backend>`` and ``cp-<backend>`` are
PyTorch's SDPA on one GPU and its context parallel; ``rl-<variant>[-<kernel>]`` is a
ring_lightning variant over all ranks; ``rl-standard-1gpu`` the standard ring on one
device. The work of a row, its allowed (query, key) pairs, comes from
``ring_lightning.models.flops.attention_pairs``, the project's one counter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from _common import import_engine

attention, flops = import_engine("attention", "models.flops")

DEFAULT_IMPLS = ("sdpa-cudnn", "sdpa-flash", "cp-cudnn", "cp-flash", "rl-standard", "rl-standard-cudnn",
                 "rl-standard-flash", "rl-distributed", "rl-hilbert", "rl-block_sparse", "rl-standard-1gpu")
DILATED_IMPLS = ("rl-standard", "rl-standard-cudnn", "rl-standard-flash", "rl-hilbert", "rl-standard-1gpu")
RING_KERNELS = ("cudnn", "flash", "efficient", "math")


@dataclass
class Spec:
    key: str       #: row name, e.g. "cp-cudnn"
    impl: str      #: sdpa | cp | ring | ring1
    pattern: str   #: dense | dilated
    backend: str = "auto"  #: SDPA backend (sdpa, cp) or ring kernel (ring, ring1)
    variant: str = "standard"

    @property
    def is_ring(self) -> bool:
        return self.impl in ("ring", "ring1")

    def gpus(self, world: int) -> int:
        return world if self.impl in ("cp", "ring") else 1


def parse_spec(key: str, pattern: str) -> Spec:
    """The ``Spec`` of one row name (ValueError listing the valid names otherwise)."""
    if key.startswith("sdpa-"):
        return Spec(key, "sdpa", pattern, backend=key.split("-", 1)[1])
    if key.startswith("cp-"):
        return Spec(key, "cp", pattern, backend=key.split("-", 1)[1])
    if key == "rl-standard-1gpu":
        return Spec(key, "ring1", pattern, backend="auto", variant="standard")
    if key.startswith("rl-"):
        rest, kernel = key[3:], "auto"
        for k in RING_KERNELS:
            if rest.endswith("-" + k):
                rest, kernel = rest[: -len(k) - 1], k
        return Spec(key, "ring", pattern, backend=kernel, variant=rest)
    raise ValueError(f"unknown impl {key!r}; valid: {DEFAULT_IMPLS}")


def make_specs(impls: List[str], dilated: bool) -> List[Spec]:
    """Dense rows for every name, then dilated rows for the names that support dilation."""
    dilated_keys = [k for k in DILATED_IMPLS if k in impls] if dilated else []
    return [parse_spec(k, "dense") for k in impls] + [parse_spec(k, "dilated") for k in dilated_keys]


def dilated_patterns(n: int, segments: List[str], rates: List[int]) -> List[Tuple[int, int]]:
    """(segment, rate) pairs of the dilated rows; segment 'N' = the whole sequence, clamped to n."""
    segs = [n if s in ("N", "n") else int(s) for s in segments]
    return [(min(w, n), r) for w, r in zip(segs, rates)]


def ring_fields(spec: Spec, args, n: int) -> Dict[str, Any]:
    """``create_ring_attention`` keyword arguments of a ring row at sequence length ``n``."""
    fields: Dict[str, Any] = {"kernel": spec.backend}
    if spec.pattern == "dilated":
        pats = dilated_patterns(n, args.dilated_segments, args.dilated_rates)
        fields.update(segment_lengths=[w for w, _ in pats], dilation_rates=[r for _, r in pats])
    if spec.variant == "block_sparse":
        fields.update(block_size=args.block_size, sparsity_ratio=args.sparsity_ratio)
    return fields


def row_pairs(spec: Spec, args, n: int, heads: int, causal: bool) -> float:
    """Allowed (query, key) pairs of the row over all heads (one sample)."""
    pattern: Dict[str, Any] = {}
    if spec.pattern == "dilated":
        pats = dilated_patterns(n, args.dilated_segments, args.dilated_rates)
        pattern.update(segment_lengths=[w for w, _ in pats], dilation_rates=[r for _, r in pats])
    if spec.is_ring and spec.variant == "block_sparse":
        attn = attention.create_ring_attention("block_sparse", **ring_fields(spec, args, n))
        pattern.update(block_mask=attn.block_mask(n), block_size=args.block_size)
    return flops.attention_pairs(n, heads, causal=causal, **pattern)
