"""Which (query piece, key piece) work exists, and which tokens cross the ring.

Everything here is a pure function of (sequence length, group size, layout, patterns,
causal, head counts, head offset), so every rank derives the same plan without talking: that is how a
receiver knows what a sender will send, and how empty work is skipped on both sides.

Terms. A rank's shard is one or two *pieces* (``sharding.Piece``) of length ``P``. A
pattern ``(w, r)`` with offset ``o`` (query heads ``h`` with ``h % r == o``) selects, in a
segment, the positions whose in-segment index is ``o mod r``. ``h`` is the GLOBAL head index:
a call that holds heads ``[head_offset, head_offset + H)`` of the model (the ring behind an
all-to-all over heads, ulysses.py) gives its local head ``j`` the offset
``(j + head_offset) % r``. Two kinds of pattern:

* local (``w`` divides ``P``): every segment lies inside one piece, so the pattern is
  computed from local tokens only, batched over the piece's ``P/w`` segments. No
  communication at all.
* spanning (``P`` divides ``w``): a piece lies inside one segment, so a query piece needs
  the key pieces of its own segment, which other ranks may hold. Only the ``P/r``
  selected tokens of a key piece travel (the volume divided by ``r``), and only to the
  ranks whose pieces share its segment and (if causal) come after it.

Letters: B batch, T local length, H query heads, K kv heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch

from ..sequence.lengths import LengthRules, check_length
from ..sequence.sharding import Piece, rank_pieces

FULL, CAUSAL = "full", "causal"


@dataclass(frozen=True)
class Pattern:
    index: int
    segment: int  #: clamped segment length w
    dilation: int  #: r
    spans: bool  #: segments are longer than a piece


@dataclass(frozen=True)
class Task:
    """Attention of query piece ``q_piece`` (receiver) to key piece ``k_piece`` (sender)."""

    pattern: Pattern
    offset: int
    q_piece: int
    k_piece: int
    kind: str  #: FULL or CAUSAL (top-left aligned; only when both pieces are the same)

    @property
    def item(self) -> "Item":
        """The shipped slice this task's keys come from."""
        return Item(self.pattern, self.offset, self.k_piece)


@dataclass(frozen=True)
class Item:
    """One tensor slice a sender ships: the selected kv tokens/heads of one of its pieces."""

    pattern: Pattern
    offset: int
    k_piece: int


class RingPlan:
    def __init__(
        self,
        seq_len: int,
        group_size: int,
        layout: str,
        patterns: Sequence[Tuple[int, int]],
        is_causal: bool,
        num_heads: int,
        num_kv_heads: int,
        sparse: Optional[tuple] = None,  #: (block_size, ...) of a block mask: its length rule only
        head_offset: int = 0,
    ) -> None:
        self.seq_len, self.group_size, self.layout = seq_len, group_size, layout
        self.is_causal = is_causal
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_offset = head_offset  #: global index of local head 0
        # the geometry (pieces, segments, spanning dilations): one message with the length that works
        check_length(seq_len, LengthRules(tuple(w for w, _ in patterns), tuple(r for _, r in patterns),
                                          group_size, layout, sparse[0] if sparse else None))
        self.pieces: List[List[Piece]] = [
            rank_pieces(seq_len, group_size, r, layout) for r in range(group_size)
        ]
        piece_len = self.pieces[0][0].length
        self.piece_len = piece_len
        self.patterns: List[Pattern] = []
        for i, (w, r) in enumerate(patterns):
            # local (w divides the piece) or spanning (a multiple of it): check_length above
            self.patterns.append(Pattern(i, w, r, spans=piece_len % w != 0))
        self._tasks = {}

    # --- heads ------------------------------------------------------------------------
    def _first_head(self, pattern: Pattern, offset: int) -> int:
        """The first local head whose GLOBAL index is ``offset`` mod the dilation rate."""
        return (offset - self.head_offset) % pattern.dilation

    def offsets(self, pattern: Pattern) -> List[int]:
        """Offsets that have at least one query head and one selected token per segment."""
        width = pattern.segment if not pattern.spans else self.piece_len
        return [o for o in range(pattern.dilation)
                if self._first_head(pattern, o) < self.num_heads and o < width]

    def q_heads(self, pattern: Pattern, offset: int) -> slice:
        return slice(self._first_head(pattern, offset), None, pattern.dilation)

    def kv_heads(self, pattern: Pattern, offset: int) -> Tuple[List[int], List[int]]:
        """(kv heads to fetch, index into them for each selected query head)."""
        group = self.num_heads // self.num_kv_heads
        per_q = [h // group for h in range(self._first_head(pattern, offset), self.num_heads, pattern.dilation)]
        needed = sorted(set(per_q))
        return needed, [needed.index(g) for g in per_q]

    # --- tokens -----------------------------------------------------------------------
    def select(self, x: torch.Tensor, piece: Piece, pattern: Pattern, offset: int) -> torch.Tensor:
        """View (B, segments, tokens, ...) of the tokens ``pattern``/``offset`` selects in ``piece``.

        ``x`` is a rank-local tensor (B, T, ...); the view shares its storage, so the ring can
        read inputs and write accumulators through it.
        """
        span = x.narrow(1, piece.local_offset, piece.length)  # (B, P, ...)
        r = pattern.dilation
        if pattern.spans:
            # The piece starts at a multiple of P, hence of r: selection is piece-relative.
            return span[:, offset::r].unsqueeze(1)  # (B, 1, P/r, ...)
        w = pattern.segment
        segs = span.unflatten(1, (piece.length // w, w))  # (B, P/w, w, ...)
        return segs[:, :, offset::r]  # (B, P/w, |o::r|, ...)

    def positions(self, rank: int, piece_idx: int, pattern: Pattern, offset: int) -> torch.Tensor:
        """Global positions of the selected tokens, shaped (segments, tokens)."""
        piece = self.pieces[rank][piece_idx]
        pos = torch.arange(piece.start, piece.start + piece.length).unsqueeze(0)  # (1, P)
        return self.select(pos, Piece(piece.start, piece.length, 0), pattern, offset)[0]

    # --- work -------------------------------------------------------------------------
    def tasks(self, dst: int, src: int) -> List[Task]:
        """Work rank ``dst`` does with the keys of rank ``src`` (cached)."""
        key = (dst, src)
        if key not in self._tasks:
            self._tasks[key] = self._build_tasks(dst, src)
        return self._tasks[key]

    def _build_tasks(self, dst: int, src: int) -> List[Task]:
        """Every task of the patterns and causality; the masks drop theirs (mask_protocol.MaskSet.restrict)."""
        out = []
        q_pieces, k_pieces = self.pieces[dst], self.pieces[src]
        for pat in self.patterns:
            for o in self.offsets(pat):
                if not pat.spans:
                    if dst == src:  # local segments never leave their piece
                        kind = CAUSAL if self.is_causal else FULL
                        out.extend(Task(pat, o, a, a, kind) for a in range(len(q_pieces)))
                    continue
                for a, qp in enumerate(q_pieces):
                    for b, kp in enumerate(k_pieces):
                        if qp.start // pat.segment != kp.start // pat.segment:
                            continue
                        if not self.is_causal:
                            out.append(Task(pat, o, a, b, FULL))
                        elif kp.start < qp.start:
                            out.append(Task(pat, o, a, b, FULL))
                        elif kp.start == qp.start:
                            out.append(Task(pat, o, a, b, CAUSAL))
        return out

    def num_candidate_blocks(self, dst: int, src: int) -> int:
        """(pattern, offset, q piece, k piece) combinations before skipping."""
        n = 0
        for pat in self.patterns:
            per = len(self.offsets(pat))
            if pat.spans:
                n += per * len(self.pieces[dst]) * len(self.pieces[src])
            elif dst == src:
                n += per * len(self.pieces[dst])
        return n

    def items(self, src: int, dst: int) -> List[Item]:
        """What ``src`` sends to ``dst`` (empty for dst == src: no transfer)."""
        if src == dst:
            return []
        seen = []
        for t in self.tasks(dst, src):
            if t.item not in seen:
                seen.append(t.item)
        return seen

    def item_shape(self, item: Item, batch: int, head_dim: int) -> Tuple[int, int, int, int]:
        """(B, tokens, kv heads, D) of one shipped slice."""
        tokens = self.piece_len // item.pattern.dilation
        return (batch, tokens, len(self.kv_heads(item.pattern, item.offset)[0]), head_dim)


class FilteredPlan:
    """A plan whose tasks (and so its transfers) are the static plan's that ``keeps(plan, dst,
    task, src)`` accepts: masks that empty whole tasks (mask_protocol.MaskSet.restrict, packed
    documents). ``keeps`` must give every rank the same answer, so that a receiver and its
    sender agree on what travels. Everything else is the wrapped plan's."""

    def __init__(self, plan, keeps) -> None:
        self._plan, self._keeps = plan, keeps
        self._tasks: dict = {}

    def __getattr__(self, name):
        return getattr(self._plan, name)

    def tasks(self, dst: int, src: int) -> List[Task]:
        if (dst, src) not in self._tasks:
            self._tasks[(dst, src)] = [t for t in self._plan.tasks(dst, src) if self._keeps(self._plan, dst, t, src)]
        return self._tasks[(dst, src)]

    def items(self, src: int, dst: int) -> List[Item]:
        return RingPlan.items(self, src, dst)  # derived from the filtered tasks


@lru_cache(maxsize=64)
def get_plan(seq_len, group_size, layout, patterns, is_causal, num_heads, num_kv_heads, sparse=None,
             head_offset=0) -> RingPlan:
    return RingPlan(seq_len, group_size, layout, patterns, is_causal, num_heads, num_kv_heads, sparse, head_offset)
