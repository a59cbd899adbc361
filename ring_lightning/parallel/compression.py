"""Gradient compression as DDP communication hooks (gloo and NCCL alike).

A DDP communication hook replaces the all-reduce of one gradient *bucket* (a flat
tensor holding several parameters' gradients) with a function returning a future of
the averaged bucket. Methods:

* ``none``: no hook; DDP's own all-reduce.
* ``topk``: each rank sends the ``ratio`` fraction of entries largest in magnitude,
  values and indices (all-gather), and every rank sums what it receives and divides by
  the world size. Biased, so error feedback (Stich et al. 2018, "Sparsified SGD with
  memory") keeps what was not sent and adds it to the next step's gradient.
* ``randomk``: the same, with indices drawn at random. All ranks draw the SAME indices
  from a generator seeded by (seed, step, parameter), so the values can be all-reduced and
  no indices travel: half the bytes of all-gathering values and indices, and the sum is
  a plain all-reduce. Not rescaled by ``1/ratio``: with error feedback the unsent part
  arrives later instead of being amplified noise now.
* Both sparse methods choose their entries per parameter (``ratio`` of each parameter
  within the bucket) and keep their error feedback per parameter name, so nothing depends
  on how DDP groups parameters into buckets (it regroups them after the first step, and a
  resumed run starts from the initial grouping): a checkpoint carries the memory and the
  step counter (``compression_checkpoint.py``) and a resumed run
  compresses exactly as the uninterrupted one.
* ``powersgd``: torch's ``powerSGD_hook`` (Vogels et al. 2019), low-rank approximation
  of every matrix-shaped gradient, ``rank`` = matrix approximation rank.
* ``bf16``: the bucket is cast to bfloat16, divided by the world size and all-reduced;
  half the bytes, about 3 significant digits.

Each hook records how many bytes it put on the wire against the bytes of the dense
gradient (per rank payload, not counting the collective algorithm's own overhead):
``state.stats.ratio`` is that fraction for the last completed step.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
from torch import nn
from torch.nn.parallel import DistributedDataParallel

#: the hooks' names, defined once at the attention config's edge (which accepts them too)
from ring_lightning.attention.config_adapter import COMPRESSION_METHODS  # noqa: E402

# DDP inspects hook annotations: they must be these real objects (hence no
# `from __future__ import annotations` in this file).
Future = torch.futures.Future[torch.Tensor]


@dataclass
class CompressionStats:
    """Bytes sent against dense bytes, accumulated per optimizer step."""

    bytes_sent: int = 0  #: bytes this rank put on the wire in the current step so far
    bytes_dense: int = 0  #: bytes a dense all-reduce of the same buckets would send
    ratio: float = 1.0  #: bytes_sent / bytes_dense of the last completed step (1.0 before any)
    steps: int = 0  #: completed steps (hook calls on the last bucket of a backward)

    def record(self, bucket: dist.GradBucket, sent: int, dense: int) -> None:
        """Add one bucket's bytes; close the step on DDP's last bucket."""
        self.bytes_sent += sent
        self.bytes_dense += dense
        if bucket.is_last():
            self.ratio = self.bytes_sent / max(self.bytes_dense, 1)
            self.bytes_sent = self.bytes_dense = 0
            self.steps += 1


@dataclass
class SparseState:
    """State of the ``topk`` / ``randomk`` hooks.

    Attributes:
        process_group: group to average over (``None``: the default world group).
        ratio: fraction of each parameter's entries sent, in ``(0, 1]``.
        error_feedback: keep the unsent remainder per parameter and add it next step.
        seed: base seed of the shared random indices (``randomk``).
        names: ``id(parameter)`` -> its name in the model (stable across runs and regroupings).
    """

    process_group: Optional[dist.ProcessGroup]
    ratio: float
    error_feedback: bool = True
    seed: int = 0
    names: Dict[int, str] = field(default_factory=dict)
    residuals: Dict[str, torch.Tensor] = field(default_factory=dict)  #: parameter name -> unsent remainder
    stats: CompressionStats = field(default_factory=CompressionStats)

    def __post_init__(self) -> None:
        self.order = {name: i for i, name in enumerate(self.names.values())}  #: name -> place in the model

    def state_dict(self) -> Dict[str, Any]:
        return {"steps": self.stats.steps, "residuals": {k: v.detach().cpu().clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.stats.steps = int(state["steps"])
        self.residuals = dict(state["residuals"])  # moved to the gradients' device on first use


def _num_kept(numel: int, ratio: float) -> int:
    return max(1, min(numel, math.ceil(ratio * numel)))


def _slices(state: SparseState, bucket: dist.GradBucket) -> List[Tuple[str, int, int]]:
    """(parameter name, offset, length) of every parameter in the bucket's flat buffer."""
    out, offset = [], 0
    for p in bucket.parameters():
        out.append((state.names[id(p)], offset, p.numel()))
        offset += p.numel()
    assert offset == bucket.buffer().numel(), "a DDP bucket holds its parameters' gradients back to back"
    return out


def _with_residual(state: SparseState, bucket: dist.GradBucket, slices) -> torch.Tensor:
    """The bucket's gradient plus what earlier steps did not send (a new tensor)."""
    corrected = bucket.buffer().clone()
    if state.error_feedback:
        for name, offset, numel in slices:
            residual = state.residuals.get(name)
            if residual is not None:
                corrected[offset:offset + numel] += residual.to(corrected.device)
    return corrected


def _keep_residual(state: SparseState, corrected: torch.Tensor, idx: torch.Tensor, slices) -> None:
    if state.error_feedback:
        corrected[idx] = 0  # what was sent leaves the memory; the rest waits for the next step
        for name, offset, numel in slices:
            state.residuals[name] = corrected[offset:offset + numel]


def _sparse_bucket(state: SparseState, bucket: dist.GradBucket):
    """(group, world size, flat gradient, its length) of one bucket."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buffer = bucket.buffer()
    return group, dist.get_world_size(group), buffer, buffer.numel()


def topk_hook(state: SparseState, bucket: dist.GradBucket) -> Future:
    """Send the largest-magnitude ``ratio`` of entries (values + indices); average over the group."""
    group, world, buffer, numel = _sparse_bucket(state, bucket)
    slices = _slices(state, bucket)
    corrected = _with_residual(state, bucket, slices)
    magnitude = corrected.abs()
    idx = torch.cat([magnitude[o:o + n].topk(_num_kept(n, state.ratio), sorted=False).indices + o
                     for _, o, n in slices])
    k = idx.numel()
    values = corrected[idx]
    _keep_residual(state, corrected, idx, slices)

    # One all_gather of a byte payload [int32 indices | values] per rank: a single future,
    # like torch's own hooks (chaining two NCCL futures with collect_all let the decode
    # read the indices before their transfer had finished on the GPU). Indices first keeps
    # the values' offset aligned. int32 indices: buckets are far below 2**31 entries.
    assert numel < 2**31
    idx_bytes = k * 4
    payload = torch.cat([idx.to(torch.int32).view(torch.uint8), values.contiguous().view(torch.uint8)])
    gathered = [torch.empty_like(payload) for _ in range(world)]
    fut = dist.all_gather(gathered, payload, group=group, async_op=True).get_future()
    state.stats.record(bucket, sent=payload.numel(), dense=numel * buffer.element_size())

    def decompress(_: Future) -> torch.Tensor:
        # Several ranks may pick the same index: index_add_ sums them.
        buffer.zero_()
        for p in gathered:
            buffer.index_add_(0, p[:idx_bytes].view(torch.int32).long(), p[idx_bytes:].view(buffer.dtype))
        return buffer.div_(world)

    return fut.then(decompress)


def randomk_hook(state: SparseState, bucket: dist.GradBucket) -> Future:
    """Send a shared random ``ratio`` of entries (values only); average over the group."""
    group, world, buffer, numel = _sparse_bucket(state, bucket)
    slices = _slices(state, bucket)
    # Same seed on every rank (the step advances in lockstep under DDP; the parameter's
    # place in the model is the same everywhere), so every rank picks the same indices
    # without communicating them, whatever bucket the parameter landed in.
    order = state.order
    picked = []
    for name, offset, n in slices:
        gen = torch.Generator(device="cpu")
        gen.manual_seed((state.seed * 1_000_003 + state.stats.steps) * 65_537 + order[name])
        picked.append(torch.randperm(n, generator=gen)[:_num_kept(n, state.ratio)] + offset)
    idx = torch.cat(picked).to(buffer.device)
    k = idx.numel()

    corrected = _with_residual(state, bucket, slices)
    values = corrected[idx]
    _keep_residual(state, corrected, idx, slices)
    fut = dist.all_reduce(values, group=group, async_op=True).get_future()
    state.stats.record(bucket, sent=k * values.element_size(), dense=numel * buffer.element_size())

    def decompress(f: Future) -> torch.Tensor:
        buffer.zero_()
        buffer[idx] = f.value()[0]
        return buffer.div_(world)

    return fut.then(decompress)


@dataclass
class Bf16State:
    """State of the ``bf16`` hook."""

    process_group: Optional[dist.ProcessGroup]
    reduce_in_bf16: bool = True  #: False when the backend cannot sum bfloat16 (see _backend_sums_bf16)
    stats: CompressionStats = field(default_factory=CompressionStats)


def bf16_hook(state: Bf16State, bucket: dist.GradBucket) -> Future:
    """All-reduce the bucket in bfloat16 (pre-divided by the world size), cast back on arrival."""
    buffer = bucket.buffer()
    numel = buffer.numel()
    state.stats.record(bucket, sent=numel * 2, dense=numel * buffer.element_size())
    if state.reduce_in_bf16:
        return default_hooks.bf16_compress_hook(state.process_group, bucket)
    # Fallback for a backend without bfloat16 sums (older gloo builds): round to bf16 so
    # the numbers are those of a bf16 wire format, but reduce in float32. Same result as
    # bf16 up to the summation's own rounding; no bandwidth saved, which stats still
    # report as if sent in bf16 (the ratio describes the format, not this fallback).
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    rounded = buffer.to(torch.bfloat16).to(buffer.dtype).div_(dist.get_world_size(group))
    fut = dist.all_reduce(rounded, group=group, async_op=True).get_future()

    def decompress(f: Future) -> torch.Tensor:
        return buffer.copy_(f.value()[0])

    return fut.then(decompress)


def _backend_sums_bf16(group: Optional[dist.ProcessGroup]) -> bool:
    """Probe once (a collective: every rank calls it at registration) whether bf16 sums work."""
    probe = torch.ones(1, dtype=torch.bfloat16)
    if dist.get_backend(group) == "nccl":
        return True
    try:
        dist.all_reduce(probe, group=group)
    except (RuntimeError, ValueError):
        return False
    return True


@dataclass
class PowerSGDHookState:
    """torch's ``PowerSGDState`` plus the bytes accounting shared by every hook here."""

    inner: powersgd.PowerSGDState
    stats: CompressionStats = field(default_factory=CompressionStats)

    def state_dict(self) -> Dict[str, Any]:
        # torch keys PowerSGD's error and warm-start memories by DDP bucket index, which a
        # resumed DDP assigns afresh: only the step counter carries over (the memories
        # restart, so a resumed powersgd run is close to, not equal to, the uninterrupted one).
        return {"steps": self.stats.steps, "iter": self.inner.iter}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.stats.steps, self.inner.iter = int(state["steps"]), int(state["iter"])


def powersgd_hook(state: PowerSGDHookState, bucket: dist.GradBucket) -> Future:
    """torch's ``powerSGD_hook``, with this module's bytes accounting."""
    inner = state.inner
    numel = bucket.buffer().numel()
    elem = bucket.buffer().element_size()
    dense_phase = inner.iter < inner.start_powerSGD_iter  # torch runs a plain all-reduce then
    before = inner.total_numel_after_compression
    fut = powersgd.powerSGD_hook(inner, bucket)
    sent = numel if dense_phase else inner.total_numel_after_compression - before
    state.stats.record(bucket, sent=sent * elem, dense=numel * elem)
    return fut


def check_compression_args(method: str, ratio: float, rank: int) -> None:
    """Raise a ValueError naming the field when a compression setting is out of range."""
    if method not in COMPRESSION_METHODS:
        raise ValueError(f"compression={method!r} is not a compression method; valid values: {COMPRESSION_METHODS}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"compression_ratio must be in (0, 1], got {ratio}")
    if rank < 1:
        raise ValueError(f"powersgd_rank must be >= 1, got {rank}")


def register_compression_hook(
    ddp_model: DistributedDataParallel,
    method: str,
    process_group: Optional[dist.ProcessGroup] = None,
    ratio: float = 0.1,
    rank: int = 1,
    error_feedback: bool = True,
    powersgd_start_iter: int = 2,
    seed: int = 0,
) -> Optional[Any]:
    """Register the gradient-compression hook ``method`` on a DDP-wrapped model.

    Every rank of ``process_group`` must call it (the ``bf16`` probe is a collective).

    Args:
        ddp_model: the ``DistributedDataParallel`` module.
        method: one of ``COMPRESSION_METHODS``.
        process_group: the group DDP reduces over (``None``: world).
        ratio: fraction of entries kept by ``topk``/``randomk``, in ``(0, 1]``.
        rank: matrix approximation rank of ``powersgd`` (>= 1).
        error_feedback: carry the compression error into the next step
            (``topk``, ``randomk``, ``powersgd``).
        powersgd_start_iter: plain all-reduce for this many steps before PowerSGD starts
            (torch requires > 1 with error feedback or warm start).
        seed: seed of the shared ``randomk`` indices.

    Returns:
        The hook's state (its ``stats`` attribute carries the achieved ratio), or ``None``
        for ``"none"``.

    Raises:
        ValueError: unknown ``method`` or an out-of-range ``ratio``/``rank``/``powersgd_start_iter``.
    """
    check_compression_args(method, ratio, rank)
    hook: Callable
    state: Any
    if method == "none":
        return None
    if method in ("topk", "randomk"):
        names = {id(p): name for name, p in ddp_model.module.named_parameters() if p.requires_grad}
        state = SparseState(process_group, ratio, error_feedback, seed, names)
        hook = topk_hook if method == "topk" else randomk_hook
    elif method == "bf16":
        state = Bf16State(process_group, reduce_in_bf16=_backend_sums_bf16(process_group))
        hook = bf16_hook
    else:
        if powersgd_start_iter < 2:
            raise ValueError(
                f"powersgd_start_iter must be >= 2 (DDP builds its buckets during the first steps), "
                f"got {powersgd_start_iter}"
            )
        inner = powersgd.PowerSGDState(
            process_group=process_group,
            matrix_approximation_rank=rank,
            start_powerSGD_iter=powersgd_start_iter,
            use_error_feedback=error_feedback,
            warm_start=True,
            random_seed=seed,
        )
        state, hook = PowerSGDHookState(inner), powersgd_hook
    ddp_model.register_comm_hook(state, hook)
    return state


# ------------------------------------------------------ what attention configs ask for
def _asked_by_attention(m: nn.Module, default_ratio: float, default_feedback: bool) -> Optional[Tuple[str, float, bool]]:
    """What an attention module's config asks the DDP hook for, if anything.

    The attention config accepts the compression fields at its edge and hands them over
    through ``attention.config_adapter.compression_request`` (the ``distributed`` variant
    only); ``None`` ratio -> the strategy's.
    """
    from ring_lightning.attention.config_adapter import compression_request

    asked = compression_request(getattr(m, "variant", None), getattr(m, "config", None))
    if asked is None:
        return None
    return asked.method, default_ratio if asked.ratio is None else asked.ratio, asked.error_feedback


def resolve_compression(method: str, ratio: float, error_feedback: bool,
                        ring_modules: Sequence[nn.Module]) -> Tuple[str, float, bool]:
    """The strategy's compression, or the one a ``distributed`` attention config asks for.

    Raises:
        ValueError: the strategy and an attention config, or two configs, ask for different ones.
    """
    asked = {a for a in (_asked_by_attention(m, ratio, error_feedback) for m in ring_modules) if a is not None}
    if method != "none":
        if any(a[0] != method for a in asked):
            raise ValueError(
                f"RingStrategy(compression={method!r}) conflicts with the attention config's "
                f"compression_method {sorted(a[0] for a in asked)}; set one of them"
            )
        return method, ratio, error_feedback
    if len(asked) > 1:
        raise ValueError(f"ring attention modules ask for different gradient compressions: {sorted(asked)}")
    if asked:
        return asked.pop()
    return "none", ratio, error_feedback
