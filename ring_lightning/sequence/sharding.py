"""How global sequence positions map to the ranks of a sequence-parallel group.

Two layouts:

* ``contiguous``: rank ``r`` holds positions ``[r*N/W, (r+1)*N/W)``; what slicing gives.
* ``zigzag``: the sequence is cut into ``2W`` chunks and rank ``r`` holds chunks ``r`` and
  ``2W-1-r``. Under a causal mask every rank then gets the same amount of work.

A rank's shard is a list of *pieces* (contiguous runs of global positions): one piece
for ``contiguous``, two for ``zigzag``. Everything else (positions for RoPE and labels,
which ranks must talk, which blocks are empty) is derived from the pieces.

Letters: B batch, N global sequence length, T local length (N/W), W group size.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from .lengths import LengthRules, check_length

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Piece:
    """A contiguous run of global positions held by one rank."""

    start: int  #: first global position
    length: int  #: number of positions
    local_offset: int  #: where the run starts inside the rank's local shard


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not a sharding layout; valid values: {LAYOUTS}")


def check_divisible(seq_len: int, group_size: int, layout: str) -> None:
    """Raise a ValueError saying which length works if the layout cannot split (lengths.py)."""
    _check_layout(layout)
    check_length(seq_len, LengthRules(group_size=group_size, layout=layout))


def rank_pieces(seq_len: int, group_size: int, rank: int, layout: str) -> List[Piece]:
    """The pieces of global positions that ``rank`` holds, in local order."""
    check_divisible(seq_len, group_size, layout)
    if not 0 <= rank < group_size:
        raise ValueError(f"rank {rank} is outside a group of size {group_size}")
    if layout == "contiguous":
        local = seq_len // group_size
        return [Piece(rank * local, local, 0)]
    chunk = seq_len // (2 * group_size)
    return [
        Piece(rank * chunk, chunk, 0),
        Piece((2 * group_size - 1 - rank) * chunk, chunk, chunk),
    ]


def sequence_positions(
    seq_len: int, group_size: int, rank: int, layout: str = "contiguous", device=None
) -> torch.Tensor:
    """Global positions (LongTensor of shape ``(seq_len // group_size,)``) of ``rank``'s shard."""
    parts = [
        torch.arange(p.start, p.start + p.length, device=device)
        for p in rank_pieces(seq_len, group_size, rank, layout)
    ]
    return torch.cat(parts)


def shard_sequence(
    x: torch.Tensor, group_size: int, rank: int, layout: str = "contiguous", dim: int = 1
) -> torch.Tensor:
    """This rank's shard of a full-sequence tensor (a copy for zigzag, a view otherwise)."""
    seq_len = x.shape[dim]
    pieces = rank_pieces(seq_len, group_size, rank, layout)
    parts = [x.narrow(dim, p.start, p.length) for p in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def unshard_sequence(shards: List[torch.Tensor], layout: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Reassemble the full sequence from every rank's shard (rank order)."""
    group_size = len(shards)
    local = shards[0].shape[dim]
    if layout == "contiguous":
        return torch.cat(shards, dim=dim)
    _check_layout(layout)
    half = local // 2
    chunks: List[Optional[torch.Tensor]] = [None] * (2 * group_size)
    for r, s in enumerate(shards):
        chunks[r] = s.narrow(dim, 0, half)
        chunks[2 * group_size - 1 - r] = s.narrow(dim, half, half)
    return torch.cat(chunks, dim=dim)  # type: ignore[arg-type]


def gather_sequence(
    x: torch.Tensor, group: Optional[dist.ProcessGroup] = None, layout: str = "contiguous", dim: int = 1
) -> torch.Tensor:
    """All-gather every rank's shard and return the full sequence (no autograd)."""
    if not dist.is_available() or not dist.is_initialized():
        return x
    world = dist.get_world_size(group)
    if world == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(shards, x.contiguous(), group=group)
    return unshard_sequence(shards, layout, dim)


@lru_cache(maxsize=64)
def all_to_all_chunk_order(seq_len: int, group_size: int, ulysses_size: int, ring_rank: int,
                           layout: str) -> Tuple[Tuple[int, int], ...]:
    """Where the ring's shard comes from after the all-to-all over heads (hybrid parallelism).

    The ``ulysses_size`` consecutive ranks ``ring_rank * U + u`` of a ``group_size``-rank group
    each hold their ``layout`` shard; together they hold exactly ring rank ``ring_rank``'s
    shard of the same layout over ``group_size / U`` ranks (for zigzag too: chunks ``rU..rU+U-1``
    and their mirrors), in another order. Returns, for each chunk of that ring shard in local
    order (chunks of one piece's length), ``(u, piece index on rank u)`` it is copied from.

    Raises:
        ValueError: U does not divide the group, or the layouts do not tile (a new layout).
    """
    if ulysses_size < 1 or group_size % ulysses_size != 0:
        raise ValueError(f"ulysses_size={ulysses_size} must divide the group size {group_size}")
    ring = rank_pieces(seq_len, group_size // ulysses_size, ring_rank, layout)
    chunk = rank_pieces(seq_len, group_size, 0, layout)[0].length
    order: List[Optional[Tuple[int, int]]] = [None] * (sum(p.length for p in ring) // chunk)
    for u in range(ulysses_size):
        for i, p in enumerate(rank_pieces(seq_len, group_size, ring_rank * ulysses_size + u, layout)):
            home = [r for r in ring if r.start <= p.start and p.start + p.length <= r.start + r.length]
            if len(home) != 1 or (p.start - home[0].start) % chunk:
                raise ValueError(f"layout {layout!r}: rank {ring_rank * ulysses_size + u}'s piece {p} is not a "
                                 f"chunk of ring rank {ring_rank}'s shard {ring}")
            order[(home[0].local_offset + p.start - home[0].start) // chunk] = (u, i)
    assert all(o is not None for o in order), (layout, order)  # U shards of T fill the ring's U*T
    return tuple(order)  # type: ignore[arg-type]


def pad_to_multiple(x: torch.Tensor, multiple: int, dim: int = 1, value: float = 0) -> torch.Tensor:
    """Pad ``x`` along ``dim`` at the end so its length is a multiple of ``multiple``
    (``ring_lightning.sequence.lengths.length_multiple`` gives one every rule of an attention accepts)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    length = x.shape[dim]
    pad = (-length) % multiple
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    filler = torch.full(shape, value, dtype=x.dtype, device=x.device)
    return torch.cat([x, filler], dim=dim)


# --------------------------------------------------------------- the active sharding
@dataclass(frozen=True)
class SequenceSharding:
    """How the sequences of the current step are split: created by whoever shards, read by attention.

    ``group=None`` means nothing is split (one device, or data parallelism only). Ring
    attention called with ``already_split=True`` inside :func:`sequence_sharding` takes its
    group and layout from here; nothing is stored in the attention modules.

    Hybrid sequence parallelism (docs/ARCHITECTURE.md, "Hybrid sequence parallelism"):
    ``ulysses_group`` (U consecutive ranks of ``group``) trades sequence for heads with an
    all-to-all, then the ring runs over ``ring_group`` (the K/U ranks at stride U); both or
    neither. (The global index of a call's first head is an argument of the ring entry behind
    the all-to-all, not a field here.)
    """

    group: Optional["dist.ProcessGroup"] = None
    layout: str = "contiguous"
    ulysses_group: Optional["dist.ProcessGroup"] = None
    ring_group: Optional["dist.ProcessGroup"] = None

    def __post_init__(self) -> None:
        _check_layout(self.layout)
        if (self.ulysses_group is None) != (self.ring_group is None):
            raise ValueError("a hybrid sequence sharding needs both ulysses_group and ring_group (or neither)")


#: Nothing is split (one device, data parallelism only, or attention outside a step): the one
#: declaration, used by the strategies and by LongDocumentLM under a plain strategy.
NOTHING_SPLIT = SequenceSharding(None)

# A process-wide slot, not a ContextVar: autograd runs backward (and with it the
# recomputation of checkpointed blocks, which calls attention again) on its own device
# threads, where a ContextVar set on the main thread would not be visible.
_active: Optional[SequenceSharding] = None
# What applies outside any sequence_sharding block; RingStrategy sets "nothing split" for its
# run, so attention called outside a step (a callback, a model summary) never rings across
# data-parallel replicas.
_default: Optional[SequenceSharding] = None


@contextmanager
def sequence_sharding(group: Optional["dist.ProcessGroup"], layout: str = "contiguous",
                      ulysses_group: Optional["dist.ProcessGroup"] = None,
                      ring_group: Optional["dist.ProcessGroup"] = None) -> Iterator[SequenceSharding]:
    """Make ``(group, layout)`` the sharding of every ring attention call inside the block.

    ``RingStrategy`` enters it around each step (forward and backward) with the batch's
    sequence group and layout (and its hybrid groups, :class:`SequenceSharding`); a
    hand-written loop does the same::

        with sequence_sharding(sp_group, "zigzag"):
            loss = model(shard_of_batch).backward()
    """
    with use_sequence_sharding(SequenceSharding(group, layout, ulysses_group, ring_group)) as active:
        yield active


@contextmanager
def use_sequence_sharding(value: SequenceSharding) -> Iterator[SequenceSharding]:
    """Make ``value`` the sharding of every ring attention call inside the block (a strategy
    enters it with its batch's :class:`SequenceSharding`, built once per batch)."""
    global _active
    previous, _active = _active, value
    try:
        yield value
    finally:
        _active = previous


def active_sequence_sharding() -> Optional[SequenceSharding]:
    """The innermost :func:`sequence_sharding` in force, else the default (usually None)."""
    return _active if _active is not None else _default


def set_default_sequence_sharding(value: Optional[SequenceSharding]) -> Optional[SequenceSharding]:
    """Set what applies outside any :func:`sequence_sharding` block; returns the previous value."""
    global _default
    previous, _default = _default, value
    return previous


def sequence_entries(batch, keys, sp: int) -> Optional[Tuple[List[str], int]]:
    """``(names of the sequence entries present, their length N)``, or None: pass the batch through.

    A batch passes through unsharded only when nothing is split (``sp == 1``): under sp > 1
    every rank of a group would hold whole sequences while DDP averages over the group,
    silently wrong, so a non-dict batch or one without any of ``keys`` is an error.

    Raises:
        ValueError: as above, an entry with fewer than 2 dims, or entries of different lengths.
    """
    if not isinstance(batch, Mapping):
        if sp > 1:
            raise ValueError(
                f"RingStrategy(sequence_parallel_size={sp}) shards dict batches along the sequence; got a "
                f"{type(batch).__name__}. Return a dict of (batch, seq, ...) tensors (keys in the module's "
                f"sequence_keys, default {keys}) from your dataloader."
            )
        return None
    present = [k for k in keys if isinstance(batch.get(k), torch.Tensor)]
    if not present:
        if sp > 1:
            raise ValueError(
                f"RingStrategy(sequence_parallel_size={sp}) found none of the sequence keys {keys} in the "
                f"batch (keys: {sorted(batch)}); name yours in the LightningModule's `sequence_keys`"
            )
        return None
    for k in present:
        if batch[k].dim() < 2:
            raise ValueError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}; sequence entries are (batch, seq, ...)")
    lengths = {k: batch[k].shape[1] for k in present}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"sequence entries disagree on the length (dim 1): {lengths}")
    return present, lengths[present[0]]
