"""Which sequence lengths a configuration accepts, and the nearest one that works.

One owner for every rule that constrains the global length N (docs/ARCHITECTURE.md,
"Sequence lengths"), so that a message never advises a length that another rule refuses:

* the layout splits N into ``parts`` = W (contiguous) or 2W (zigzag) equal pieces;
* every segment length w, clamped to N, divides N (LongNet segments tile the sequence);
* every clamped segment divides the piece length P = N / parts (it stays on one rank) or is
  a multiple of it (it spans ranks), and a spanning segment's dilation rate divides P;
* block_sparse: ``block_size`` divides N (the block mask tiles the sequence).

:func:`length_multiple` is a unit every multiple of which is valid (the least common multiple
of pieces x segments and the block size: what ``pad_to_multiple`` and data pipelines need);
:func:`smallest_valid_length` the first length >= N that passes every rule;
:func:`check_length` raises ONE ValueError naming every broken rule and that length. The
attention (config.py, plan.py, masks.py), the sharding, the FLOPs counter and the pre-flight
check of train.py all ask here; ``ParallelDims.length_rules`` (dims.py) builds the rules of a
parallel shape. This file imports nothing of the package: the attention passes its own rules in
(``RingAttentionConfig.length_rules``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

LAYOUT_PARTS = {"contiguous": 1, "zigzag": 2}
# The search for a valid length walks multiples of a unit; past this many candidates it
# returns the length that is valid by construction (every segment inside one piece).
_MAX_CANDIDATES = 100_000


@dataclass(frozen=True)
class LengthRules:
    """What constrains the global sequence length of one attention configuration.

    Args:
        segment_lengths: LongNet segment lengths (None: dense).
        dilation_rates: one per segment (None: all 1).
        group_size: ranks the sequence is split over (W).
        layout: ``contiguous``, ``zigzag``, or ``auto`` (either: the strategy picks one that splits).
        block_size: the block_sparse mask's block edge (None: no block mask).
        split_size: ranks the strategy cuts the sequence over when more than ``group_size``: the
            hybrid cuts over sp ranks, the ring after its all-to-all runs over sp / U
            (None: the cut is the ring's group).
    """

    segment_lengths: Optional[Tuple[int, ...]] = None
    dilation_rates: Optional[Tuple[int, ...]] = None
    group_size: int = 1
    layout: str = "contiguous"
    block_size: Optional[int] = None
    split_size: Optional[int] = None

    def __post_init__(self) -> None:
        segs = None if self.segment_lengths is None else tuple(int(w) for w in self.segment_lengths)
        rates = self.dilation_rates
        rates = (1,) * len(segs) if segs is not None and rates is None else rates
        object.__setattr__(self, "segment_lengths", segs)
        object.__setattr__(self, "dilation_rates", None if rates is None else tuple(int(r) for r in rates))
        if self.layout not in ("auto", *LAYOUT_PARTS):
            raise ValueError(f"layout={self.layout!r} is not valid; valid values: {('auto', *LAYOUT_PARTS)}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.split_size is not None and (self.split_size < self.group_size or self.split_size % self.group_size):
            raise ValueError(f"split_size={self.split_size} must be a multiple of group_size={self.group_size}")

    @property
    def _cut(self) -> int:
        """The ranks the sequence is cut over (the strategy's split): split_size, else the group."""
        return self.split_size or self.group_size

    def _layouts(self) -> Sequence[str]:
        if self._cut == 1:
            return ("contiguous",)  # one rank: nothing is split, the layout is moot
        return tuple(LAYOUT_PARTS) if self.layout == "auto" else (self.layout,)

    def _parts(self, layout: str) -> int:
        return self.group_size * LAYOUT_PARTS[layout]

    def _cut_parts(self, layout: str) -> int:
        """Equal pieces the strategy's cut needs (a multiple of the ring's pieces)."""
        return self._cut * LAYOUT_PARTS[layout] if self._cut > 1 else 1

    # ------------------------------------------------------------------ the rules
    def problems(self, seq_len: int, layout: Optional[str] = None) -> List[str]:
        """Every rule ``seq_len`` breaks under ``layout`` (default: the first of ``self.layout``)."""
        layout = layout or self._layouts()[0]
        out = []
        parts = self._parts(layout) if self.group_size > 1 else 1
        cut = self._cut_parts(layout)  # the ring's pieces divide the cut's: one rule says both
        if seq_len % cut:
            out.append(f"the {layout!r} layout over {self._cut} ranks splits it into {cut} equal pieces")
        if self.block_size and seq_len % self.block_size:
            out.append(f"block_size {self.block_size} must divide it")
        piece = seq_len // parts if seq_len % parts == 0 else None
        for w, r in zip(self.segment_lengths or (), self.dilation_rates or ()):
            w = min(w, seq_len)  # segments longer than the sequence are clamped to it
            if seq_len % w:
                out.append(f"segment length {w} must divide it")
            elif piece is not None and piece % w and w % piece:
                out.append(f"segment length {w} must divide or be a multiple of the per-rank piece ({piece})")
            elif piece is not None and piece % w and piece % r:
                out.append(f"dilation rate {r} of segment {w}, which spans ranks, must divide the piece ({piece})")
        return out

    def valid_layouts(self, seq_len: int) -> List[str]:
        """The layouts (of those allowed) under which ``seq_len`` breaks no rule."""
        return [lay for lay in self._layouts() if not self.problems(seq_len, lay)]

    def multiple(self) -> int:
        """A length unit every multiple of which breaks no rule: the least common multiple of
        ``parts x w`` for every segment w (each segment then lies inside one piece) and of the
        block size. Shorter valid lengths may exist (segments spanning ranks, clamped segments):
        :meth:`smallest_valid` finds them."""
        layouts = self._layouts()
        # auto: the contiguous layout (what the strategy falls back to) needs the smaller unit
        parts = self._parts(layouts[0]) if self.group_size > 1 else 1
        unit = self._cut_parts(layouts[0])
        for w in self.segment_lengths or ():
            unit = math.lcm(unit, parts * w)
        return math.lcm(unit, self.block_size or 1)

    def _step(self, n: int) -> int:
        """What every valid length >= n is a multiple of: the pieces, the block, the segments <= n."""
        parts = min(self._cut_parts(lay) for lay in self._layouts())
        step = math.lcm(parts, self.block_size or 1)
        for w in self.segment_lengths or ():
            if w <= n:
                step = math.lcm(step, w)
        return step

    def smallest_valid(self, seq_len: int) -> int:
        """The smallest length >= ``seq_len`` that breaks no rule (``seq_len`` itself if valid)."""
        unit = self.multiple()
        safe = -(-seq_len // unit) * unit  # valid by construction
        n = seq_len
        for _ in range(_MAX_CANDIDATES):
            step = self._step(n)
            n = -(-n // step) * step
            if n >= safe:
                break
            if self.valid_layouts(n):
                return n
            n += 1
        return safe

    def describe(self) -> str:
        """The constraints in words, for messages."""
        bits = []
        if self._cut > self.group_size:  # the hybrid: cut over sp ranks, the ring over sp / U
            bits.append(f"{self._cut} ranks, layout {self.layout!r}, the ring over {self.group_size}")
        elif self._cut > 1:
            bits.append(f"{self.group_size} ranks, layout {self.layout!r}")
        if self.segment_lengths:
            bits.append(f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}")
        if self.block_size:
            bits.append(f"block_size={self.block_size}")
        return "; ".join(bits) or "no constraint"


def length_multiple(segment_lengths=None, group_size: int = 1, layout: str = "contiguous",
                    block_size: Optional[int] = None) -> int:
    """:meth:`LengthRules.multiple` of these constraints (what ``pad_to_multiple`` needs)."""
    return LengthRules(_tuple(segment_lengths), None, group_size, layout, block_size).multiple()


def _tuple(values) -> Optional[Tuple[int, ...]]:
    return None if values is None else tuple(int(v) for v in values)


def length_error(seq_len: int, rules: LengthRules, override: Optional[str] = None) -> Optional[str]:
    """The message for a ``seq_len`` the rules refuse (None when it is valid).

    Args:
        override: the name the user changes the length with (e.g. ``data.seq_len``); the
            message then says ``<override>=<length that works>``.
    """
    if rules.valid_layouts(seq_len):
        return None
    problems = rules.problems(seq_len)
    good = rules.smallest_valid(seq_len)
    pad, unit = good - seq_len, rules.multiple()
    fix = f"set {override}={good}" if override else f"use length {good}"
    return (f"sequence length {seq_len} does not fit the attention ({rules.describe()}): "
            f"{'; '.join(problems)}. {fix[0].upper() + fix[1:]} (pad {pad} more positions); every "
            f"multiple of {unit} works (ring_lightning.sequence.sharding.pad_to_multiple(x, {unit}))")


def check_length(seq_len: int, rules: LengthRules, override: Optional[str] = None) -> None:
    """Raise one ValueError naming every broken rule and the nearest length that works."""
    message = length_error(seq_len, rules, override)
    if message is not None:
        raise ValueError(message)
