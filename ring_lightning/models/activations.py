"""Activation memory: checkpointed groups whose inputs live on the host, and sequence tiles.

Two autograd Functions, both exact (the same arithmetic as the plain path, recomputed):

* ``recompute_offloaded(run, x, params, offload)``: ``run(x)`` under ``no_grad`` in forward,
  ``x`` copied to pinned host memory on a side stream (``HostOffload``), and in backward
  ``x`` brought back (prefetched one group ahead), ``run`` recomputed with the autocast and
  RNG state of the forward, and its gradients taken. The only tensor a group keeps is its
  input, and it is on the host. Parameters are explicit inputs, so their gradients leave
  through ordinary autograd edges (DDP's hooks fire as for any layer). Where the recomputation
  reads other tensors than those given (FSDP2 gathers each block's parameters into new tensors
  around the block's forward), backward back-propagates through it in place instead, as an
  ordinary backward: the gradients accumulate into what was read and its hooks (FSDP2's
  reduce-scatter into the shards) fire, as for the reentrant form of ``torch.utils.checkpoint``.
  That path takes one forward per backward: after a second forward with gradient through the
  same blocks, FSDP2 sees a block's second recomputation within one backward as a replay whose
  gradients it has reduced already, and drops them; such a backward raises ``INTERLEAVED_IN_PLACE``.
* ``tiled(fn, x, params, tile)``: ``fn`` applied to sequence tiles of ``x`` (dim 1), in
  forward and in backward, so only one tile's intermediates are ever alive (the SwiGLU's
  (T, hidden_dim) tensors are the largest of a block).

The model (model.py) decides where they apply; nothing here knows about blocks or ranks.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence

import torch


def _autocast_state(device_type: str) -> dict:
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextlib.contextmanager
def _replayed(rng, device: torch.device, autocast: dict):
    """Run under the forward's RNG (restored afterwards) and autocast state, with grad on."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=True):
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        with torch.enable_grad(), torch.autocast(**autocast):
            yield


class HostOffload:
    """Pinned host memory for tensors kept between forward and backward, copied off the compute stream.

    Each forward pass takes a ``new_pass()``: ``put(x)`` (forward) copies ``x`` to a pinned
    buffer on a side stream and lets the caching allocator reuse ``x``'s memory once the copy
    is done; ``get(i)`` (backward, in reverse order) returns slot ``i`` on the device and
    starts copying slot ``i - 1`` back, so the copies overlap the recomputation of the group
    in between. A pass's buffers go back to the pool when its graph is freed (after backward,
    or when the loss is dropped), so two forwards before one backward never share a buffer,
    and buffers are reused step after step (pinning gigabytes takes about a second per GB).
    On a CPU device nothing moves.
    """

    def __init__(self) -> None:
        self._free: List[torch.Tensor] = []  # pinned buffers no live pass holds
        self._allocated_bytes = 0
        self._stream: Optional[torch.cuda.Stream] = None
        self.backwards_begun = 0  # passes whose backward has begun (what _OffloadPass.interleaved reads)

    @property
    def host_bytes(self) -> int:
        """Pinned bytes allocated (what this rank takes from the host)."""
        return self._allocated_bytes

    def new_pass(self) -> "_OffloadPass":
        return _OffloadPass(self)

    def _side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        fits = [b for b in self._free if b.dtype == dtype and b.numel() >= numel]
        if fits:
            buffer = min(fits, key=torch.Tensor.numel)
            self._free.remove(buffer)
            return buffer
        self._allocated_bytes += numel * dtype.itemsize
        return torch.empty(numel, dtype=dtype, pin_memory=True)


class _OffloadPass:
    """The slots of one forward pass (see ``HostOffload``)."""

    def __init__(self, owner: HostOffload) -> None:
        self._owner = owner
        self._slots: list = []  # per slot: (host tensor, shape, dtype, device)
        self._buffers: List[torch.Tensor] = []
        self._ready: dict = {}  # slot -> (device tensor, event) of a prefetch in flight
        self._backwards_at_forward = owner.backwards_begun
        #: another pass's backward began between this pass's forward and its backward: two forwards
        #: ran before one backward (set when this pass's backward begins)
        self.interleaved: Optional[bool] = None

    def __del__(self) -> None:
        # Copies still queued on the side stream are ordered before any later use of these
        # buffers, which is queued on the same stream.
        self._owner._free.extend(self._buffers)

    def put(self, x: torch.Tensor) -> int:
        slot = len(self._slots)
        if x.device.type != "cuda":
            self._slots.append((x.detach(), x.shape, x.dtype, x.device))
            return slot
        buffer = self._owner._take(x.numel(), x.dtype)
        self._buffers.append(buffer)
        host = buffer[:x.numel()]
        side, compute = self._owner._side_stream(x.device), torch.cuda.current_stream(x.device)
        side.wait_stream(compute)  # x is written
        with torch.cuda.stream(side):
            host.copy_(x.detach().reshape(-1), non_blocking=True)
        x.record_stream(side)  # the allocator keeps x's memory until the copy has run
        self._slots.append((host, x.shape, x.dtype, x.device))
        return slot

    def _fetch(self, slot: int):
        host, shape, dtype, device = self._slots[slot]
        compute = torch.cuda.current_stream(device)
        out = torch.empty(shape, dtype=dtype, device=device)
        side = self._owner._side_stream(device)
        side.wait_stream(compute)  # out's memory is free for this stream
        with torch.cuda.stream(side):
            out.view(-1).copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(side)
        return out, done

    def get(self, slot: int) -> torch.Tensor:
        if self.interleaved is None:  # this pass's backward begins
            self.interleaved = self._owner.backwards_begun != self._backwards_at_forward
            self._owner.backwards_begun += 1
        host, shape, dtype, device = self._slots[slot]
        if device.type != "cuda":
            return host
        out, done = self._ready.pop(slot, None) or self._fetch(slot)
        torch.cuda.current_stream(device).wait_event(done)
        if slot > 0 and slot - 1 not in self._ready:
            self._ready[slot - 1] = self._fetch(slot - 1)  # overlaps this group's recompute
        return out


class _RecomputeOffloaded(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, run_for_graph, offload, x, *params):
        ctx.run, ctx.offload, ctx.params = run_for_graph or run, offload, params
        ctx.device = x.device
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = _rng_state(x.device)
        with torch.no_grad():
            y = run(x)
        ctx.slot = offload.put(x)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x = ctx.offload.get(ctx.slot).detach().requires_grad_(ctx.needs_input_grad[3])
        with _replayed(ctx.rng, ctx.device, ctx.autocast):
            y = ctx.run(x)
        given = [p for p, need in zip(ctx.params, ctx.needs_input_grad[4:]) if need]
        given_ids = {id(p) for p in given}
        read = [t for t in _leaves(y) if t is not x]
        others = [t for t in read if id(t) not in given_ids]
        if others:  # the recomputation read other tensors than those given: accumulate in place
            if ctx.offload.interleaved:
                raise RuntimeError(INTERLEAVED_IN_PLACE)
            _accumulate(y, grad_y, x, read_given=len(others) < len(read), others=others)
            return (None, None, None, x.grad if x.requires_grad else None, *[None] * len(ctx.params))
        wanted = ([x] if x.requires_grad else []) + given
        grads = iter(torch.autograd.grad(y, wanted, grad_y, allow_unused=True)) if wanted else iter(())
        grad_x = next(grads) if x.requires_grad else None
        grad_params = [next(grads) if need else None for need in ctx.needs_input_grad[4:]]
        return (None, None, None, grad_x, *grad_params)


#: Raised where the in-place backward would give wrong gradients (tests/distributed/test_fsdp.py).
INTERLEAVED_IN_PLACE = (
    "checkpointing=offload: the training step ran the model twice (or more) with gradient before one backward, "
    "and its blocks gather their parameters around their own forward (FSDP2, strategy=ring_fsdp). FSDP2 takes "
    "a block's second recomputation within one backward for a replay whose gradients it has already reduced "
    "and drops them: the gradients would be wrong. Run one forward per backward, or set checkpointing=full "
    "(or selective / none) instead of checkpointing=offload, or strategy=ring (DDP)")


def _leaves(y: torch.Tensor) -> List[torch.Tensor]:
    """The tensors a backward from ``y`` accumulates gradients into (its graph's AccumulateGrad nodes)."""
    found, seen, stack = [], set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad
            found.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


def _accumulate(y, grad_y, x, read_given: bool, others: List[torch.Tensor]) -> None:
    """Back-propagate ``grad_y`` through the recomputed ``y`` into ``x.grad`` and the ``.grad`` of
    the tensors it read (``others``), as an ordinary backward would, with their hooks.

    This is the case of a module whose parameters are gathered into new tensors around its own
    forward (FSDP2's ``fully_shard``: the recomputation calls the blocks, whose hooks gather the
    parameters, and reduce-scatter their gradients into the shards once accumulated); the
    parameters given at forward (the shards) are not read and get nothing through this Function.
    """
    if read_given:
        raise RuntimeError(
            "recompute_offloaded: the recomputation read some of the parameters given to it and other "
            "tensors requiring grad besides: give every tensor requiring grad that run reads (its params), "
            "or none of them when a wrapper (FSDP2) gathers them around the forward")
    torch.autograd.backward(y, grad_y, inputs=([x] if x.requires_grad else []) + others)


def recompute_offloaded(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                        params: Sequence[torch.Tensor], offload: "_OffloadPass",
                        run_for_graph: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """``run(x)``, keeping only ``x`` (on the host, in a slot of ``offload``, this forward
    pass's ``HostOffload.new_pass()``) for backward; ``params``: every tensor requiring grad
    that ``run`` reads besides ``x`` (its parameters), their gradients returned through this
    Function; or, where modules gather their parameters into other tensors around their own
    forward (FSDP2), none of what ``run`` reads: then backward accumulates the gradients into
    what it read, through the modules' hooks (module docstring). ``run_for_graph``: what backward
    recomputes instead of ``run``, when the caller has a cheaper one: the same autograd graph,
    but its output's values may be left unset (backward only differentiates through it)."""
    return _RecomputeOffloaded.apply(run, run_for_graph, offload, x, *params)


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, tile, values_needed, n_inputs, *tensors):
        inputs, params = tensors[:n_inputs], tensors[n_inputs:]
        ctx.fn, ctx.tile, ctx.params = fn, tile, params
        ctx.autocast = _autocast_state(inputs[0].device.type)
        T = inputs[0].shape[1]
        outs = None
        with torch.no_grad():
            # values not needed: the first tile gives the shapes, the outputs are NaN (so any reader
            # would see it), backward recomputes every tile from the saved inputs as always
            for s in range(0, T if values_needed else 1, tile):
                piece = fn(*(x[:, s:s + tile] for x in inputs))
                piece = piece if isinstance(piece, tuple) else (piece,)
                if outs is None:  # filled tile by tile: never a second copy of the whole output
                    outs = [p.new_empty((p.shape[0], T, *p.shape[2:])) for p in piece]
                for out, p in zip(outs, piece):
                    out[:, s:s + tile] = p
                del piece
            if not values_needed:
                for out in outs:
                    out.fill_(float("nan"))
        ctx.save_for_backward(*inputs)
        return tuple(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grad_outs):
        inputs = ctx.saved_tensors
        n_in = len(inputs)
        needs_in, needs_p = ctx.needs_input_grad[4:4 + n_in], ctx.needs_input_grad[4 + n_in:]
        grad_in = [torch.empty_like(x) if need else None for x, need in zip(inputs, needs_in)]
        grad_params: List[Optional[torch.Tensor]] = [None] * len(ctx.params)
        wanted_params = [p for p, need in zip(ctx.params, needs_p) if need]
        for s in range(0, inputs[0].shape[1], ctx.tile):
            tiles = [x[:, s:s + ctx.tile].detach().requires_grad_(need) for x, need in zip(inputs, needs_in)]
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                outs = ctx.fn(*tiles)
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = [(o, g[:, s:s + ctx.tile]) for o, g in zip(outs, grad_outs) if g is not None and o.requires_grad]
            wanted = [t for t, need in zip(tiles, needs_in) if need] + wanted_params
            if not pairs or not wanted:
                continue
            grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs],
                                             allow_unused=True))
            for i, need in enumerate(needs_in):
                if need:
                    g = next(grads)
                    grad_in[i][:, s:s + ctx.tile] = 0 if g is None else g
            for i, need in enumerate(needs_p):
                if not need:
                    continue
                g = next(grads)
                if g is not None:
                    # float32 sums across tiles (the parameters' own dtype, float32 under AMP)
                    grad_params[i] = g.float() if grad_params[i] is None else grad_params[i] + g
        grad_params = [g.to(p.dtype) if g is not None else None for g, p in zip(grad_params, ctx.params)]
        return (None, None, None, None, *grad_in, *grad_params)


def tiled(fn: Callable, inputs, params: Sequence[torch.Tensor], tile: int, values_needed: bool = True):
    """``fn(*inputs)`` computed over tiles of ``tile`` tokens along dim 1, forward and backward.

    ``inputs``: a tensor or a tuple of (B, T, ...) tensors; ``fn`` must act per token and
    return a tensor or a tuple of (B, T, ...) tensors; ``params``: every tensor requiring grad
    that ``fn`` reads besides ``inputs``. Only the inputs are kept for backward; each tile is
    recomputed there and back-propagated at once. ``values_needed=False``: only the autograd
    graph of the output is wanted (a recomputation whose output nothing reads): forward then
    computes one tile, not all of them, and the output holds NaN.
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    if tile <= 0 or inputs[0].shape[1] <= tile:
        return fn(*inputs)
    return _Tiled.apply(fn, tile, values_needed, len(inputs), *inputs, *params)
