"""RingAttentionBase: the module every variant shares (input checks, groups, sharding).

Each call is described once (route.AttentionCall) and follows the route that
route.choose_route picks; execute.py runs each route, ulysses.py the hybrid one. A variant
declares what it is (its masks, its RingContext options such as its ``TaskPath``, the
plan's restriction) and never chooses a route; the ring itself (ring.py), its transfers
(comm.py) and the merge (merge.py) are shared.

Process group and layout are read at each call, never stored by a strategy: inside a
``sharding.sequence_sharding(group, layout)`` block (RingStrategy enters one around every
step) they come from it; otherwise from ``set_process_group`` (standalone use), else the
default group if a script initialised torch.distributed itself, else one device. See
docs/ARCHITECTURE.md ("The shard context").
"""

from __future__ import annotations

import dataclasses
import warnings
from types import MappingProxyType
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..sequence.lengths import check_length
from ..sequence.sharding import active_sequence_sharding
from .comm import BufferPool, RingComm
from .config import RingAttentionConfig
from .documents import DocumentMask, check_document_ids
from .execute import EXECUTORS
from .execution import execution_options
from .flex import block_mask_for as flex_block_mask, block_mask_of as flex_block_mask_of, flex_importable
from .inputs import check_qkv, to_bthd
from .kernel_policy import KernelPolicy
from .mask_protocol import CausalMask, MaskSet
from .plan import get_plan
from .profiling import RingProfiler
from .route import AttentionCall, Route, choose_route
from .ulysses import ulysses_attention

_UNSET = object()


class RingAttentionBase(nn.Module):
    """Exact ring attention over a sequence split across a process group.

    Call: ``out = attn(q, k, v, is_causal=False, already_split=False)`` with
    q (B, T, H, D), k/v (B, T, K, D), ``H % K == 0``. See docs/ARCHITECTURE.md.
    """

    variant = "standard"
    #: variant declaration: True blocks every communication wait with ``comm_timeout_s`` on every
    #: backend; None: gloo blocks with the timeout, NCCL orders the streams (comm.py)
    timed_waits: Optional[bool] = None

    def __init__(self, config: Optional[RingAttentionConfig] = None, **fields) -> None:
        super().__init__()
        if config is None:
            config = RingAttentionConfig(**fields)
        elif fields:
            config = dataclasses.replace(config, **fields)
        if not isinstance(config, RingAttentionConfig):
            raise TypeError(f"config must be a RingAttentionConfig, got {type(config).__name__}")
        self.config = config
        config.warn_inert_fields(self.variant)
        if config.attention_dtype is not None and not config.enable_mixed_precision:
            warnings.warn("RingAttentionConfig.attention_dtype has no effect without "
                          "enable_mixed_precision=True", UserWarning, stacklevel=2)
        self._group = _UNSET  # set_process_group's group, for standalone use only
        self._verified = set()
        self.profiler = RingProfiler()
        self.pool = BufferPool(config.max_buffer_size_mb * 2**20, config.enable_memory_pool)
        self._comm: Optional[RingComm] = None
        self._restricted: dict = {}  # plan -> the plan under the variant's masks
        self.kernels = KernelPolicy(config.kernel)  # which kernel takes each task; refusals, per module

    # ----------------------------------------------------------------- process group
    def set_process_group(self, group: Optional[dist.ProcessGroup]) -> None:
        """Standalone use only: the group this module rings over when no sharding is active.

        Under ``RingStrategy`` (or any ``sharding.sequence_sharding`` block) the active
        sharding decides and this setting is not consulted. ``None``: one device.
        """
        self._group = group
        self._comm = None

    def _sharding(self) -> Tuple[Optional[dist.ProcessGroup], Optional[str]]:
        """(group, layout of split inputs or None) for this call: the active sharding first.

        Without one, a group given by ``set_process_group``, else the default group when
        one is initialised (a script that initialised torch.distributed itself), else one device.
        """
        active = active_sequence_sharding()
        if active is not None:
            return active.group, active.layout
        if self._group is _UNSET:
            ready = dist.is_available() and dist.is_initialized()
            self._group = dist.group.WORLD if ready else None
            if ready and dist.get_world_size() > 1:
                warnings.warn(
                    f"{type(self).__name__} uses the default process group ({dist.get_world_size()} ranks) "
                    f"as its sequence-parallel group. If these ranks hold different samples (plain DDP), "
                    f"call set_process_group(None) or train with RingStrategy.", UserWarning, stacklevel=3)
        return self._group, None

    def preferred_layout(self, seq_len: int, group_size: int, is_causal: bool) -> str:
        """zigzag when a causal pattern spans ranks and zigzag can split it; else contiguous."""
        if self.config.layout != "auto":
            return self.config.layout
        if not is_causal or group_size == 1:
            return "contiguous"
        local = seq_len // group_size
        spans = any(w > local for w, _ in self.config.patterns(seq_len))
        if not spans or seq_len % (2 * group_size) != 0:
            return "contiguous"
        try:
            get_plan(seq_len, group_size, "zigzag", tuple(self.config.patterns(seq_len)), True, 1, 1)
        except ValueError:
            return "contiguous"
        return "zigzag"

    # ---------------------------------------------------- what a variant declares
    def _context_options(self, q: torch.Tensor, seq_len: int, is_causal: bool) -> dict:
        """Variant declaration: the RingContext fields of its task path (path, tile), asked once per
        call (``_describe``); execution options come from the config in every variant (execution.py)."""
        return {}

    def _declared_masks(self, seq_len: int) -> tuple:
        """Variant declaration: the masks (mask_protocol.py) of the variant itself, for ``seq_len``;
        causality and packed documents come with the call (``masks``)."""
        return ()

    def masks(self, seq_len: int, is_causal: bool = False, document_ids: Optional[torch.Tensor] = None) -> MaskSet:
        """Every mask of a call over the whole sequence, ANDed: causality, the variant's, the
        documents of (B, seq_len) ``document_ids`` (what the attention weights and checks read)."""
        masks = ([CausalMask()] if is_causal else []) + list(self._declared_masks(seq_len))
        return MaskSet(masks + ([DocumentMask(document_ids)] if document_ids is not None else []))

    def _sparse_key(self) -> Optional[tuple]:
        """Variant declaration: (block_size, pattern, ratio, seed) of a block mask the plan must honour."""
        return None

    def _restrict_plan(self, plan):
        """The plan without the tasks the variant's masks empty (their K/V are not sent); one per plan."""
        if plan not in self._restricted:
            if len(self._restricted) > 8:
                self._restricted.clear()
            self._restricted[plan] = MaskSet(self._declared_masks(plan.seq_len)).restrict(plan)
        return self._restricted[plan]

    def _flex_mask(self, call: AttentionCall, device, document_ids) -> tuple:
        """``(order, back, block_mask)`` of the call's masks for FlexAttention: the token order the
        kernel sees and its inverse (None: the caller's), and the block mask in that order."""
        declared = self._declared_masks(call.seq_len)
        if len(declared) == 1 and document_ids is None:
            form = declared[0].flex_form(call.is_causal, device)  # a mask with a FlexAttention call of its own
            if form is not None:
                return form
        grids = [m for m in declared if m.kind == "block_grid"]
        if call.masks <= {"documents", "block_grid"} and len(grids) <= 1:  # the cached builders (flex.py)
            grid = None if not grids else (grids[0].key, grids[0].block_size, lambda: grids[0].on(device))
            return None, None, flex_block_mask(call.seq_len, call.is_causal, device, grid, document_ids)
        masks = self.masks(call.seq_len, call.is_causal, document_ids)  # any other kind: its mask_mod
        batch = None if document_ids is None else document_ids.shape[0]
        return None, None, flex_block_mask_of(masks.mask_mod(device), batch, call.seq_len, device)

    # ----------------------------------------------------------------------- forward
    def forward(self, q, k, v, is_causal: bool = False, already_split: bool = False,
                return_lse: bool = False, document_ids: Optional[torch.Tensor] = None,
                qkv_layout: Optional[str] = None):
        """Attention of this rank's queries over the whole sequence.

        Args:
            q: (B, T, H, D); k, v: (B, T, K, D) with H % K == 0 (or (B, H, T, D) with
                ``qkv_layout="bhtd"``).
            is_causal: keys at global positions <= the query's only.
            already_split: True if each rank passes its own shard (layout: ``config.layout``,
                else the one the strategy set, else contiguous); False if every rank passes
                the full sequence (then the full output is returned on every rank).
            return_lse: also return the log-sum-exp (B, T, H), float32.
            document_ids: (B, T) integers laid out like q: a query attends only to keys with
                its id (packed documents, documents.py). None: one document per row.
            qkv_layout: "bthd", "bhtd" (scaled_dot_product_attention's; out and lse come back
                heads-first too), or None: "bthd", refusing a likely "bhtd" (inputs.py).
        Raises:
            ValueError / TypeError on inconsistent inputs, with what to change.
        """
        q, k, v, heads_first = to_bthd(q, k, v, qkv_layout)
        result = self._attend(q, k, v, is_causal, already_split, return_lse, document_ids)
        if not heads_first:
            return result
        return tuple(x.transpose(1, 2) for x in result) if return_lse else result.transpose(1, 2)

    def _attend(self, q, k, v, is_causal, already_split, return_lse, document_ids):
        """forward() on (B, T, H, D) inputs: describe the call once, follow its route."""
        self._check_inputs(q, k, v)
        call = self.describe_call(q, k, is_causal, already_split, return_lse, document_ids)
        return self._execute(call, q, k, v, document_ids)

    def describe_call(self, q, k, is_causal: bool = False, already_split: bool = False, return_lse: bool = False,
                      document_ids: Optional[torch.Tensor] = None) -> AttentionCall:
        """What a call with these (B, T, H, D) inputs is (route.py): ``route.choose_route`` of it is
        the way it is computed. Raises what the call would raise for its length and masks."""
        active = active_sequence_sharding()
        if already_split and active is not None and active.ulysses_group is not None:
            return self._hybrid_call(q, k, active, is_causal, return_lse)
        group, active_layout = self._sharding()
        return self._describe(q, k, group, active_layout, is_causal, already_split, return_lse, document_ids)

    def _ring_entry(self, q, k, v, *, group, layout: str, head_offset: int, is_causal: bool,
                    return_lse: bool, document_ids) -> torch.Tensor:
        """The ring inside a hybrid call (ulysses.py): split inputs on ``group`` holding heads from
        ``head_offset`` on; the hybrid call started this module's figures, so they are kept."""
        call = self._describe(q, k, group, layout, is_causal, True, return_lse, document_ids, head_offset)
        return self._execute(call, q, k, v, document_ids, fresh_profile=False)

    def _execute(self, call: AttentionCall, q, k, v, document_ids, fresh_profile: bool = True):
        route = choose_route(call)
        if route is Route.HYBRID:
            return ulysses_attention(self, q, k, v, call, document_ids)
        if fresh_profile:
            self._start_profile(q.device)
        return EXECUTORS[route](self, call, q, k, v, document_ids)

    def _start_profile(self, device) -> None:
        self.profiler.reset(device, self.config.profile_memory)
        self.profiler.calls += 1

    # ------------------------------------------------------------ the call, described
    def _hybrid_call(self, q, k, active, is_causal: bool, return_lse: bool) -> AttentionCall:
        """A call under a hybrid sharding: ulysses.py checks and describes the ring call inside."""
        sp = dist.get_world_size(active.group)
        return AttentionCall(tuple(q.shape), tuple(k.shape), q.dtype, q.device.type, q.shape[1] * sp,
                             world=sp, rank=dist.get_rank(active.group), layout=active.layout,
                             already_split=True, is_causal=bool(is_causal), return_lse=bool(return_lse),
                             hybrid=True, kernel=self.config.kernel, sharding=active)

    def _placement(self, q, group, active_layout, already_split: bool, is_causal: bool) -> tuple:
        """(world, rank, layout, seq_len) of the call: where this rank's tokens sit."""
        cfg = self.config
        world = 1 if group is None else dist.get_world_size(group)
        if cfg.ring_size is not None and cfg.ring_size != world:
            raise ValueError(f"ring_size={cfg.ring_size} but the sequence-parallel group has {world} ranks; "
                             f"set ring_size=None or {world}")
        if world == 1:
            return 1, 0, "contiguous", q.shape[1]
        if not already_split and active_layout is not None:
            raise ValueError(
                "a sequence sharding is active (RingStrategy shards every batch along the sequence), "
                "so each rank holds a shard: call the attention with already_split=True")
        if not already_split:
            return world, dist.get_rank(group), self.preferred_layout(q.shape[1], world, is_causal), q.shape[1]
        layout = active_layout or (cfg.layout if cfg.layout != "auto" else "contiguous")
        if cfg.layout not in ("auto", layout):
            raise ValueError(
                f"the batch is sharded with layout={layout!r} but this module's config says "
                f"layout={cfg.layout!r}; leave config.layout='auto' (the sharder decides) or pass "
                f"RingStrategy(layout={cfg.layout!r})")
        return world, dist.get_rank(group), layout, q.shape[1] * world

    def _describe(self, q, k, group, active_layout, is_causal, already_split, return_lse, document_ids,
                  head_offset: int = 0) -> AttentionCall:
        """The call, once: placement, the length rules, patterns, the variant's masks and options."""
        cfg = self.config
        world, rank, layout, seq_len = self._placement(q, group, active_layout, already_split, is_causal)
        # every rule on the length at once (layout, segments, block mask): one message, lengths.py
        check_length(seq_len, cfg.length_rules(world, layout, self.variant))
        patterns = tuple(cfg.patterns(seq_len))
        masks = self.mask_kinds(q, seq_len, document_ids)
        options = {"tile": cfg.compute_block_size, **execution_options(cfg, q.dtype, type(self).__name__),
                   **self._context_options(q, seq_len, is_causal)}
        return AttentionCall(
            tuple(q.shape), tuple(k.shape), q.dtype, q.device.type, seq_len, world=world, rank=rank,
            layout=layout, already_split=bool(already_split), is_causal=bool(is_causal),
            return_lse=bool(return_lse), head_offset=head_offset, patterns=patterns, masks=masks,
            kernel=cfg.kernel, dropout_active=self.training and cfg.dropout > 0.0,
            flex_available=flex_importable(), options=MappingProxyType(options), group=group)

    def mask_kinds(self, q, seq_len: int, document_ids: Optional[torch.Tensor]) -> frozenset:
        """The kinds of the masks a call is under (the variant's, plus documents when given);
        raises when the variant's masks refuse documents or the ids do not fit q."""
        declared = self._declared_masks(seq_len)
        masks = frozenset(m.kind for m in declared)
        if document_ids is None:
            return masks
        refusals = [m.refuses_documents for m in declared if m.refuses_documents]
        if refusals:
            raise ValueError(refusals[0])
        check_document_ids(document_ids, q)
        return masks | {"documents"}

    def _check_inputs(self, q, k, v) -> None:
        check_qkv(q, k, v)

    # --------------------------------------------------------------------- stats
    def get_profiling_stats(self) -> dict:
        """Measured figures of the last call (forward and its backward)."""
        return self.profiler.stats()

    def clear_memory_pool(self) -> None:
        self.pool.clear()
        if self.config.aggressive_memory_cleanup and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def extra_repr(self) -> str:
        c = self.config
        return f"variant={self.variant}, segment_lengths={c.segment_lengths}, dilation_rates={c.dilation_rates}"


def ring_attention_modules(model: nn.Module) -> list:
    """Every ring attention module inside ``model`` (the strategy's check, the LM's statistics)."""
    return [m for m in model.modules() if isinstance(m, RingAttentionBase)]
