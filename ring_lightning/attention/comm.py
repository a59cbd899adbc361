"""Ring communication: partners, batched isend/irecv, waits with a timeout, and which
kv slices travel at each step.

The schedule is a rotation: at step ``s`` the rank at ring position ``p`` receives from
position ``p - s`` and sends to position ``p + s``. Every rank ships its OWN kv slices
(nothing is forwarded on behalf of others), so a transfer that no receiver needs is
simply not posted -- both sides derive that from the plan -- and no rank relays data it
does not use. One ``batch_isend_irecv`` per step posts all of a step's sends and receives;
K and V travel in separate buffers; there is no barrier per hop.

Waiting: on CPU (gloo) every wait carries ``timeout``; a peer that stops taking part makes
this rank raise ``RingCommunicationError`` naming it, instead of hanging. On CUDA (NCCL),
``wait()`` only orders the compute stream after the transfer, which keeps the overlap;
``blocking=True`` (the distributed variant) blocks the host with the timeout instead.

Layers: ``RingComm`` knows ranks and posts buffers; ``RingTransfers`` knows the plan: it
packs a step's kv slices into one K and one V buffer, takes receive buffers from the
pool, cuts what arrives back into slices, and returns the buffers once computed on. The
ring loop (ring.py) only says when: post step s+1, receive step s, compute, release.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .plan import Item, RingPlan
from .profiling import RingProfiler
from .views import kv_view


class RingCommunicationError(RuntimeError):
    """A ring transfer did not complete: names this rank and the peers it waited for."""


def communication_error(what: str, peer_names: str, timeout_s: float, exc) -> RingCommunicationError:
    """The one message of a transfer that did not complete (the ring's, the all-to-all's): a
    peer's closed connection, or the timeout."""
    from ring_lightning.sequence.faults import peer_failure  # the one reader of backend errors

    me = dist.get_rank()
    if exc is not None and peer_failure(exc) == "connection":
        return RingCommunicationError(
            f"rank {me}: {what} with rank(s) {peer_names} failed: a peer's connection "
            f"closed (the process ended: killed, out of memory or crashed; its log says why). Cause: {exc!r}")
    return RingCommunicationError(
        f"rank {me}: {what} with rank(s) {peer_names} did not complete within "
        f"{timeout_s:g}s (comm_timeout_s). A peer stopped taking part, crashed, or runs a "
        f"different configuration. Cause: {exc!r}"
    )


class BufferPool:
    """Reusable receive buffers, keyed by (numel, dtype, device), capped in bytes."""

    def __init__(self, max_bytes: float, enabled: bool = True) -> None:
        self.max_bytes, self.enabled = max_bytes, enabled
        self._free: Dict[tuple, List[torch.Tensor]] = {}
        self._bytes = 0

    def get(self, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        key = (numel, dtype, str(device))
        stack = self._free.get(key)
        if self.enabled and stack:
            buf = stack.pop()
            self._bytes -= buf.numel() * buf.element_size()
            return buf
        return torch.empty(numel, dtype=dtype, device=device)

    def put(self, buf: torch.Tensor) -> None:
        size = buf.numel() * buf.element_size()
        if not self.enabled or self._bytes + size > self.max_bytes:
            return  # dropped: freed by the allocator instead of pooled
        self._free.setdefault((buf.numel(), buf.dtype, str(buf.device)), []).append(buf)
        self._bytes += size

    def clear(self) -> None:
        self._free.clear()
        self._bytes = 0


class PendingTransfer:
    """The works of one step's batched transfer, and what to say if they time out."""

    def __init__(self, works, peers: Sequence[int], step: int, comm: "RingComm", recv_buffers) -> None:
        self.works, self.peers, self.step, self.comm = works, list(peers), step, comm
        self.recv_buffers = recv_buffers

    def wait(self):
        for work in self.works:
            try:
                if self.comm.blocking:
                    ok = work.wait(timeout=self.comm.timeout)
                else:
                    ok = work.wait()
            except Exception as exc:  # gloo raises on timeout / a peer that went away
                raise self.comm.error(self.peers, self.step, exc) from exc
            if ok is False:
                raise self.comm.error(self.peers, self.step, None)
        self.works = []
        return self.recv_buffers


class RingComm:
    """Ring partners and transfers within one sequence-parallel process group."""

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        timeout_s: float,
        order: Optional[Sequence[int]] = None,
        blocking: Optional[bool] = None,
    ) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.order = list(order) if order is not None else list(range(self.world))
        if sorted(self.order) != list(range(self.world)):
            raise ValueError(
                f"custom_ring_order={list(order)} must be a permutation of 0..{self.world - 1} "
                f"(the ranks of the sequence-parallel group)"
            )
        self.position = self.order.index(self.rank)
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.blocking = blocking
        self.backend = dist.get_backend(group)
        if blocking is None:
            self.blocking = self.backend != "nccl"

    def partners(self, step: int) -> Tuple[int, int]:
        """(rank received from, rank sent to) at ``step``, as group ranks."""
        recv_from = self.order[(self.position - step) % self.world]
        send_to = self.order[(self.position + step) % self.world]
        return recv_from, send_to

    def _global(self, group_rank: int) -> int:
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def error(self, peers, step, exc) -> RingCommunicationError:
        names = ", ".join(str(self._global(p)) for p in sorted(set(peers)))
        return communication_error(f"ring transfer of step {step}", names, self.timeout_s, exc)

    def exchange(
        self,
        sends: Sequence[Tuple[int, torch.Tensor]],
        recvs: Sequence[Tuple[int, torch.Tensor]],
        step: int,
        tag: int,
    ) -> PendingTransfer:
        """Post every send and receive of one step in one batch; returns a waitable."""
        ops = []
        for i, (peer, t) in enumerate(sends):
            ops.append(dist.P2POp(dist.isend, t, self._global(peer), self.group, tag + i))
        for i, (peer, t) in enumerate(recvs):
            ops.append(dist.P2POp(dist.irecv, t, self._global(peer), self.group, tag + i))
        works = dist.batch_isend_irecv(ops) if ops else []
        peers = [p for p, _ in sends] + [p for p, _ in recvs]
        return PendingTransfer(works, peers, step, self, [t for _, t in recvs])


# ------------------------------------------------------------------------ kv transfers
@dataclass
class Transfer:
    """One step's posted K/V (or dK/dV) exchange and the receive buffers it fills."""

    peer: int  #: the rank the buffers are received from
    items: List[Item]  #: the slices packed into the receive buffers, in order
    k_buf: Optional[torch.Tensor]
    v_buf: Optional[torch.Tensor]
    pending: PendingTransfer
    keep: list  #: send buffers: they must live until the transfer completes


class RingTransfers:
    """Which kv slices travel at each ring step, and their buffers, for one ring call.

    Tags: step ``s`` uses ``4s, 4s+1`` for K/V and ``4s+2, 4s+3`` for dK/dV, so a step's
    gradients never match another step's keys even with several transfers in flight.
    """

    def __init__(self, comm: RingComm, plan: RingPlan, pool: BufferPool, profiler: RingProfiler,
                 batch: int, head_dim: int, device: torch.device, sync: bool = False,
                 log_steps: bool = False) -> None:
        self.comm, self.plan, self.pool, self.profiler = comm, plan, pool, profiler
        self.batch, self.head_dim, self.device = batch, head_dim, device
        self.sync = sync and device.type == "cuda"  #: enable_profiling: synchronise after each wait
        self.log_steps = log_steps  #: profile_communication: a record per step

    def _numel(self, items: List[Item]) -> int:
        return sum(math.prod(self.plan.item_shape(it, self.batch, self.head_dim)) for it in items)

    def _post(self, step: int, tag: int, dst: int, parts, src: int, recv_items: List[Item], alloc) -> Transfer:
        """Post one exchange: flat ``parts`` (K pieces, V pieces) to ``dst`` as one K and one V
        buffer, and ``recv_items`` from ``src`` into two buffers from ``alloc(numel)``."""
        sends, keep = [], []
        if parts[0]:
            kb, vb = torch.cat(parts[0]), torch.cat(parts[1])
            sends, keep = [(dst, kb), (dst, vb)], [kb, vb]
            self.profiler.bytes_sent += 2 * kb.numel() * kb.element_size()
        kr = vr = None
        recvs = []
        if recv_items:
            n = self._numel(recv_items)
            kr, vr = alloc(n), alloc(n)
            recvs = [(src, kr), (src, vr)]
        pending = self.comm.exchange(sends, recvs, step, tag=tag)
        return Transfer(src, recv_items, kr, vr, pending, keep)

    def post_kv(self, k: torch.Tensor, v: torch.Tensor, step: int) -> Transfer:
        """Post ``step``'s K/V: send this rank's slices to one partner, receive another's."""
        src, dst = self.comm.partners(step)
        me = self.comm.rank
        send_items = self.plan.items(me, dst)
        parts = ([kv_view(self.plan, k, me, it).reshape(-1) for it in send_items],
                 [kv_view(self.plan, v, me, it).reshape(-1) for it in send_items])
        skipped = getattr(self.plan, "skipped_items", None)  # documents.DocumentPlan: pairs sharing no document
        if skipped is not None:
            self.profiler.document_bytes_saved += 2 * k.element_size() * self._numel(skipped(me, dst))
        transfer = self._post(step, 4 * step, dst, parts, src, self.plan.items(src, me),
                              lambda n: self.pool.get(n, k.dtype, k.device))
        if self.log_steps:
            self.profiler.log_step(step=step, send_to=dst, recv_from=src,
                                   bytes_sent=sum(t.numel() * t.element_size() for t in transfer.keep))
        return transfer

    def receive(self, transfer: Transfer) -> Dict[Item, Tuple[torch.Tensor, torch.Tensor]]:
        """Wait for a K/V transfer: the received (K, V) slices by item, (B, 1, L, Kn, D) each."""
        self._wait(transfer)
        self.profiler.ring_steps += 1
        return self._slices(transfer)

    def release(self, transfer: Transfer) -> None:
        """Hand a computed-on transfer's receive buffers back to the pool."""
        for buf in (transfer.k_buf, transfer.v_buf):
            if buf is not None:
                self.pool.put(buf)

    def post_grads(self, step: int, received: Transfer, grads: Dict[Item, tuple], dtype: torch.dtype) -> Transfer:
        """Send the dK/dV of the keys ``received`` at ``step`` back to their owner, and receive
        this rank's own from the rank it sent keys to. ``dtype``: the accumulator dtype, so
        that rounding does not grow with the number of ranks."""
        src, dst = self.comm.partners(step)

        def flat(it, j):  # a slice no task used (all masked) still travels, as zeros
            if it in grads:
                return grads[it][j].reshape(-1)
            return torch.zeros(math.prod(self.plan.item_shape(it, self.batch, self.head_dim)), dtype=dtype,
                               device=self.device)

        parts = ([flat(it, 0) for it in received.items], [flat(it, 1) for it in received.items])
        mine = self.plan.items(self.comm.rank, dst)  # what this rank sent to dst at this step comes back
        return self._post(step, 4 * step + 2, src, parts, dst, mine,
                          lambda n: torch.empty(n, dtype=dtype, device=self.device))

    def settle(self, transfer: Transfer) -> Dict[Item, Tuple[torch.Tensor, torch.Tensor]]:
        """Wait for a dK/dV transfer: this rank's key gradients by item, (B, 1, L, Kn, D) each."""
        self._wait(transfer)
        return self._slices(transfer)

    def _slices(self, transfer: Transfer) -> Dict[Item, Tuple[torch.Tensor, torch.Tensor]]:
        out, pos = {}, 0
        for item in transfer.items:
            shape = self.plan.item_shape(item, self.batch, self.head_dim)  # (B, L, Kn, D)
            n = math.prod(shape)
            k = transfer.k_buf[pos:pos + n].view(shape).unsqueeze(1)  # (B, 1, L, Kn, D)
            v = transfer.v_buf[pos:pos + n].view(shape).unsqueeze(1)
            out[item] = (k, v)
            pos += n
        return out

    def _wait(self, transfer: Transfer) -> None:
        with self.profiler.comm.span():
            transfer.pending.wait()
            if self.sync:
                # enable_profiling: charge the whole transfer here rather than only the part the
                # overlap left exposed (exact attribution, at the cost of the overlap)
                torch.cuda.synchronize(self.device)
