"""Point-to-point ring communication: partners, batched isend/irecv, waits with a timeout.

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
"""

from __future__ import annotations

import datetime
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


class RingCommunicationError(RuntimeError):
    """A ring transfer did not complete: names this rank and the peers it waited for."""


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
        me = dist.get_rank()
        names = ", ".join(str(self._global(p)) for p in sorted(set(peers)))
        return RingCommunicationError(
            f"rank {me}: ring transfer of step {step} with rank(s) {names} did not complete within "
            f"{self.timeout_s:g}s (comm_timeout_s). A peer stopped taking part, crashed, or runs a "
            f"different configuration. Cause: {exc!r}"
        )

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
