"""The three implementations a row can time, and the float32 references that validate them.

Each ``*_runner`` is a context manager yielding a ``Runner``: ``step()`` is one forward +
backward (``torch.autograd.grad`` of the output against the fixed output gradient) on
this rank's inputs, ``to_check`` turns a step's result into (out, dq, dk, dv) in
``(B, N_or_T, H, D)`` and ``ref_view`` restricts a full-sequence reference to what this
rank holds. The inputs ``base`` are the full-sequence q, k, v, dout in ``(B, N, heads, D)``,
identical on every rank.

  sdpa_runner  F.scaled_dot_product_attention on the full sequence, one GPU, backend forced
  cp_runner    torch.distributed.tensor.experimental.context_parallel over all ranks
  ring_runner  ring_lightning's create_ring_attention over all ranks (or one device)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

from _common import Dist, import_engine
from specs import Spec, dilated_patterns, ring_fields

import torch
import torch.nn.functional as F

attention, sharding = import_engine("attention", "sequence.sharding")


@dataclass
class Runner:
    """One row, ready to run: ``step()`` is one forward + backward."""

    step: Callable[[], Any]
    #: (output, (dq, dk, dv)) of one step -> tensors in (B, N_or_T, H, D) comparable with
    #: the reference restricted by ``ref_view``
    to_check: Callable[[Any], List[torch.Tensor]]
    ref_view: Callable[[torch.Tensor], torch.Tensor]
    stats: Callable[[], Dict[str, Any]] = lambda: {}
    #: kernels the row's attention module refused so far (its KernelPolicy; none outside the ring)
    refusals: Callable[[], List[str]] = lambda: []
    notes: List[str] = field(default_factory=list)


def sdpa_backend_ctx(name: str, device: torch.device):
    """Force one SDPA backend on CUDA; ``auto`` (or CPU) leaves PyTorch's choice."""
    if device.type != "cuda" or name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]
    return sdpa_kernel([backend])


def _sdpa_inputs(base, dtype=None):
    """q, k, v as (B, H, N, D) leaves needing grad, dout as (B, H, N, D), SDPA's GQA flag."""
    q, k, v, g = (x if dtype is None else x.to(dtype) for x in base)
    qt, kt, vt = (x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # (B, H, N, D)
    kw = {"enable_gqa": True} if k.shape[2] != q.shape[2] else {}
    return (qt, kt, vt), g.transpose(1, 2).contiguous(), kw


def _sdpa_step(qkv, g, causal: bool, backend: str, device, **kw):
    with sdpa_backend_ctx(backend, device):
        out = F.scaled_dot_product_attention(*qkv, is_causal=causal, **kw)
        grads = torch.autograd.grad(out, qkv, g)
    return out, grads


@contextlib.contextmanager
def sdpa_runner(spec: Spec, base, d: Dist, causal: bool):
    qkv, g, kw = _sdpa_inputs(base)
    notes = [] if d.device.type == "cuda" else ["CPU: default SDPA backend"]
    yield Runner(lambda: _sdpa_step(qkv, g, causal, spec.backend, d.device, **kw),
                 lambda r: [x.transpose(1, 2) for x in (r[0], *r[1])], lambda x: x, notes=notes)


_MESH = {}  # one device mesh per process: init_device_mesh creates communicators


@contextlib.contextmanager
def cp_runner(spec: Spec, base, d: Dist, causal: bool, rotate: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import (
        _cp_options, context_parallel_unshard, set_rotate_method)

    if "mesh" not in _MESH:
        _MESH["mesh"] = init_device_mesh(d.device.type, (d.world,), mesh_dim_names=("cp",))
    mesh = _MESH["mesh"]
    set_rotate_method(rotate)
    old_lb = _cp_options.enable_load_balance
    _cp_options.enable_load_balance = bool(causal)  # head-tail (zigzag) balancing needs causal
    # (B, H, N, D) contiguous buffers; context_parallel shards them in place along dim 2
    cq, ck, cv, cg = (x.transpose(1, 2).contiguous() for x in base)
    try:
        with context_parallel(mesh, buffers=[cq, ck, cv, cg], buffer_seq_dims=[2, 2, 2, 2],
                              no_restore_buffers={cq, ck, cv, cg}):
            for t in (cq, ck, cv):
                t.requires_grad_(True)

            def to_check(r):
                full = context_parallel_unshard(mesh, [r[0].detach(), *r[1]], [2, 2, 2, 2])
                return [x.transpose(1, 2) for x in full]  # (B, H, N, D) -> (B, N, H, D)

            # SDPA is patched by CP inside this context
            yield Runner(lambda: _sdpa_step((cq, ck, cv), cg, causal, spec.backend, d.device), to_check,
                         lambda x: x, notes=[f"rotate={rotate}", f"load_balance={_cp_options.enable_load_balance}"])
    finally:
        _cp_options.enable_load_balance = old_lb


def _ring_step(attn, qkv, g, causal: bool):
    out = attn(*qkv, is_causal=causal, already_split=True)
    return out, torch.autograd.grad(out, qkv, g)


@contextlib.contextmanager
def ring_runner(spec: Spec, base, d: Dist, causal: bool, args, n: int):
    attn = attention.create_ring_attention(spec.variant, **ring_fields(spec, args, n))
    notes = []
    if spec.impl == "ring1" or d.world == 1:
        group, layout = None, "contiguous"
        view = lambda x: x
    else:
        group, layout = d.group, attn.preferred_layout(n, d.world, causal)
        notes.append(f"layout={layout}")
        view = lambda x: sharding.shard_sequence(x, d.world, d.rank, layout).contiguous()
    q, k, v, g = base
    qkv = tuple(view(x).detach().clone().requires_grad_() for x in (q, k, v))  # (B, T, heads, D)
    gl = view(g)

    def stats():
        s = dict(attn.get_profiling_stats())
        s.pop("steps", None)
        return s

    with sharding.sequence_sharding(group, layout):
        yield Runner(lambda: _ring_step(attn, qkv, gl, causal), lambda r: [r[0], *r[1]], view,
                     stats=stats, refusals=attn.kernels.refusals, notes=notes)
    attn.clear_memory_pool()


def open_runner(spec: Spec, base, d: Dist, args, n: int, causal: bool):
    if spec.impl == "sdpa":
        return sdpa_runner(spec, base, d, causal)
    if spec.impl == "cp":
        return cp_runner(spec, base, d, causal, args.cp_rotate)
    return ring_runner(spec, base, d, causal, args, n)


# ------------------------------------------------------------------------ references
def _high(device) -> torch.dtype:
    return torch.float64 if device.type == "cpu" else torch.float32


def dense_reference(base, causal: bool, device) -> Tuple[List[torch.Tensor], str]:
    """out, dq, dk, dv of dense attention in float32 (float64 on CPU), (B, N, H, D)."""
    qkv, g, kw = _sdpa_inputs(base, _high(device))
    name = "sdpa-math float64" if device.type == "cpu" else "sdpa-efficient float32"
    out, grads = _sdpa_step(qkv, g, causal, "auto" if device.type == "cpu" else "efficient", device, **kw)
    return [x.detach().transpose(1, 2) for x in (out, *grads)], name


def dilated_reference(base, causal: bool, args, n: int, device) -> Tuple[List[torch.Tensor], str]:
    """The same in the dilated pattern: ring_lightning on one device, portable kernel."""
    hi = _high(device)
    pats = dilated_patterns(n, args.dilated_segments, args.dilated_rates)
    attn = attention.create_ring_attention("standard", segment_lengths=[w for w, _ in pats],
                                           dilation_rates=[r for _, r in pats], kernel="math",
                                           compute_block_size=args.ref_tile)
    q, k, v, g = (x.to(hi) for x in base)
    with sharding.sequence_sharding(None):
        out, grads = _ring_step(attn, tuple(x.requires_grad_() for x in (q, k, v)), g, causal)
    return [x.detach() for x in (out, *grads)], f"ring_lightning 1-device {str(hi).replace('torch.', '')} portable kernel"
