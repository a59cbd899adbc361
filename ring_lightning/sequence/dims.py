"""ParallelDims: the one object for the parallel shape of a run, and the rules it imposes.

The world is ``dp x sp`` ranks (docs/ARCHITECTURE.md): ``sp`` consecutive ranks hold one sample
split along the sequence (a *sequence group*), the ``dp`` groups are data-parallel replicas.
Inside a sequence group, ``ulysses`` (U) consecutive ranks trade sequence for heads with an
all-to-all and the ring runs over the ``ring = sp // U`` ranks at stride U (``groups.py``).

Who builds it: the pre-flight from the composed Hydra config (``preflight/shape.py``) and
``RingStrategy`` once the world is known; both through :meth:`ParallelDims.resolve`, the one
place ``sp="auto"`` becomes a number. Who asks it: the strategy (mesh shape, sampler, ranks,
the hybrid's groups), the data module's length check at setup and the pre-flight (the length
rules, the valid sizes). Every field is validated here, with messages that name the override
(``strategy.sequence_parallel_size``, ``strategy.ulysses_size``) and the valid values.

Room for sharded data parallelism (FSDP2): ``dp`` is every data-parallel rank, the sampler's
replicas. A ``dp_shard`` dimension splits it into ``dp_replicate x dp_shard`` here (a field,
its validation, the mesh axes); the sampler, the length rules and the sequence group do not
change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

from .lengths import LAYOUT_PARTS, LengthRules, length_error

LAYOUTS: Tuple[str, ...] = tuple(LAYOUT_PARTS)  # ("contiguous", "zigzag")
#: The layout policy: ask the attention ("auto"), or one fixed layout.
LAYOUT_POLICIES: Tuple[str, ...] = ("auto",) + LAYOUTS
#: Mesh axes, outer to inner. Ranks ``[d*sp, (d+1)*sp)`` form sequence group ``d``.
MESH_AXES: Tuple[str, str] = ("dp", "sp")
#: What the attention says its length rules are for a ring of ``group_size`` ranks in ``layout``
#: (``RingAttentionConfig.length_rules`` with the variant bound): passed in, never imported.
AttentionRules = Callable[[int, str], LengthRules]


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_sp_request(sp: Union[int, str]) -> None:
    """``sequence_parallel_size`` is ``"auto"`` or an int >= 1 (checked before the world is known)."""
    if sp != "auto" and not _is_size(sp):
        raise ValueError(f"sequence_parallel_size must be 'auto' or an int >= 1, got {sp!r}")


def check_world_size(world_size: int, sp: int) -> None:
    """``sequence_parallel_size`` must divide the world (every rank fails alike, before any group)."""
    if world_size % sp != 0:
        raise ValueError(
            f"strategy.sequence_parallel_size={sp} does not divide the world size {world_size} (num_nodes x "
            f"devices); valid values for this world: {divisors(world_size)}, or 'auto' "
            f"(train.py: strategy.sequence_parallel_size=auto, or trainer.devices=... to launch more)"
        )


def check_ulysses_size(ulysses_size: int, sp: Union[int, str]) -> None:
    """``ulysses_size`` must be an int dividing ``sequence_parallel_size`` (checked once sp is known)."""
    if not _is_size(ulysses_size):
        raise ValueError(f"strategy.ulysses_size must be an int >= 1, got {ulysses_size!r}")
    if sp != "auto" and sp % ulysses_size != 0:
        raise ValueError(
            f"strategy.ulysses_size={ulysses_size} must divide strategy.sequence_parallel_size={sp} "
            f"(all-to-all groups of U consecutive ranks inside each sequence group); valid values: "
            f"{divisors(sp)} (1: ring only, {sp}: all-to-all only)"
        )


def check_layout_policy(layout: str) -> None:
    if layout not in LAYOUT_POLICIES:
        raise ValueError(f"layout={layout!r} is not valid; valid values: {LAYOUT_POLICIES}")


@dataclass(frozen=True)
class ParallelDims:
    """The parallel shape: ``world = dp x sp`` ranks, ``sp = ulysses x ring``, and the layout policy.

    Args:
        world: every rank of the run (num_nodes x devices).
        sp: ranks per sequence group; divides ``world``.
        ulysses: U, the all-to-all size inside a sequence group; divides ``sp``.
        layout: ``"auto"`` (the attention's preference, per length) or a fixed layout.

    Raises:
        ValueError: a field outside its valid values; the message names the override and them.
    """

    world: int
    sp: int = 1
    ulysses: int = 1
    layout: str = "auto"

    def __post_init__(self) -> None:
        if not _is_size(self.world):
            raise ValueError(f"the world size must be an int >= 1, got {self.world!r}")
        if not _is_size(self.sp):
            check_sp_request(self.sp)  # names the field and its valid values
        check_world_size(self.world, self.sp)
        check_ulysses_size(self.ulysses, self.sp)
        check_layout_policy(self.layout)

    @staticmethod
    def resolve_sp(request: Union[int, str], devices_per_node: int) -> int:
        """The one place ``sequence_parallel_size="auto"`` becomes a number: every device of a
        node in one sequence group (1 on one device: plain single-device attention)."""
        check_sp_request(request)
        return max(1, devices_per_node) if request == "auto" else request

    @classmethod
    def resolve(cls, world: int, devices_per_node: int, sp: Union[int, str] = "auto", ulysses: int = 1,
                layout: str = "auto") -> "ParallelDims":
        """The shape for a ``sequence_parallel_size`` request (``"auto"`` or a size), validated."""
        return cls(world, cls.resolve_sp(sp, devices_per_node), ulysses, layout)

    # ------------------------------------------------------------------ sizes
    @property
    def dp(self) -> int:
        """Sequence groups: the data-parallel replicas (the sampler's ``num_replicas``)."""
        return self.world // self.sp

    @property
    def ring(self) -> int:
        """Ranks the ring runs over, after the all-to-all: ``sp // ulysses``."""
        return self.sp // self.ulysses

    @property
    def splits_sequence(self) -> bool:
        """More than one rank per sample: batches are sharded and attention must be ring attention."""
        return self.sp > 1

    @property
    def hybrid(self) -> bool:
        """An all-to-all before the ring (``ulysses > 1``): the hybrid's groups exist."""
        return self.ulysses > 1

    @property
    def mesh_shape(self) -> Tuple[int, int]:
        """The device mesh, axes :data:`MESH_AXES`: row ``d`` is sequence group ``d``."""
        return (self.dp, self.sp)

    def valid_sp(self) -> List[int]:
        """The sequence-parallel sizes this world accepts."""
        return divisors(self.world)

    def valid_ulysses(self, n_heads: Optional[int] = None) -> List[int]:
        """The U values this ``sp`` (and, given, the model's heads) accepts."""
        return [u for u in divisors(self.sp) if n_heads is None or n_heads % u == 0]

    def check_heads(self, n_heads: int, override: str = "model.n_heads") -> None:
        """U must divide the heads: the all-to-all hands each rank ``n_heads / U`` heads."""
        if n_heads % self.ulysses:
            raise ValueError(
                f"strategy.ulysses_size={self.ulysses} must divide the model's heads ({override}={n_heads}): "
                f"the all-to-all hands each rank heads/ulysses_size heads; valid values: "
                f"{self.valid_ulysses(n_heads)}")

    # ------------------------------------------------------------------ ranks
    def sp_rank(self, global_rank: int) -> int:
        """Index inside the sequence group (consecutive ranks: ``global % sp``)."""
        return global_rank % self.sp

    def dp_rank(self, global_rank: int) -> int:
        """Index of the sequence group."""
        return global_rank // self.sp

    def sampler_kwargs(self, global_rank: int) -> dict:
        """The distributed sampler runs over dp only: every rank of a sequence group reads the same sample."""
        return {"num_replicas": self.dp, "rank": self.dp_rank(global_rank)}

    # ------------------------------------------------------------------ lengths
    def layout_for(self, preferred: str) -> str:
        """The layout of a batch: the fixed one, or (``"auto"``) the attention's ``preferred``."""
        if not self.splits_sequence:
            return "contiguous"  # one rank: nothing is split, the layout is moot
        return preferred if self.layout == "auto" else self.layout

    def length_rules(self, attention: Optional[AttentionRules] = None, attention_layout: str = "auto") -> LengthRules:
        """Every rule on the global length under this shape: the attention's own rules over the
        ring (``attention(ring, layout)``; none given: the split alone) and the strategy's cut of
        the sequence over all ``sp`` ranks (the hybrid cuts over more ranks than the ring).

        ``attention_layout``: the layout the attention prefers when the policy is ``"auto"``
        (``RingAttentionConfig.layout``; ``"auto"`` there leaves both open)."""
        layout = attention_layout if self.layout == "auto" else self.layout
        rules = attention(self.ring, layout) if attention is not None else LengthRules(layout=layout)
        return LengthRules(rules.segment_lengths, rules.dilation_rates, self.ring, rules.layout, rules.block_size,
                           split_size=self.sp)

    def length_error(self, seq_len: int, attention: Optional[AttentionRules] = None,
                     attention_layout: str = "auto", override: Optional[str] = None) -> Optional[str]:
        """The message for a ``seq_len`` this shape refuses (None: valid); ``override`` names the
        setting to change (``data.seq_len``)."""
        return length_error(seq_len, self.length_rules(attention, attention_layout), override)

    def check_length(self, seq_len: int, attention: Optional[AttentionRules] = None,
                     attention_layout: str = "auto", override: Optional[str] = None) -> None:
        message = self.length_error(seq_len, attention, attention_layout, override)
        if message is not None:
            raise ValueError(message)

    def describe(self) -> str:
        hybrid = f" (ulysses {self.ulysses} x ring {self.ring})" if self.hybrid else ""
        return f"world {self.world} = dp {self.dp} x sp {self.sp}{hybrid}, layout {self.layout}"
