"""RingAttentionBase: the module every variant shares (input checks, groups, sharding).

A variant changes only what its name says (how blocks are computed, which tokens are
masked, which production checks run) by overriding ``_context_options``, typically to
hand the ring its ``TaskPath`` (tasks.py); the ring itself (ring.py), its transfers
(comm.py) and the merge (merge.py) are shared.

Process group and layout are read at each call, never stored by a strategy: inside a
``sharding.sequence_sharding(group, layout)`` block (RingStrategy enters one around every
step) they come from it; otherwise from ``set_process_group`` (standalone use), else the
default group if one is initialised (the usage guide's multi-GPU example), else one
device. See docs/ARCHITECTURE.md ("The shard context").
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ..lengths import check_length
from ..sharding import active_sequence_sharding, rank_pieces, shard_sequence, unshard_sequence
from .comm import BufferPool, RingComm
from .config import RingAttentionConfig
from .documents import DocumentPlan, check_document_ids, documents_for
from .flex import block_mask_for as flex_block_mask, flex_attention, flex_supported
from .inputs import check_qkv, to_bthd
from .tasks import TaskPath
from .plan import get_plan
from .profiling import RingProfiler
from .ring import RingAttentionFunction, RingContext
from .ulysses import ulysses_attention

log = logging.getLogger(__name__)
_UNSET = object()


def _stable_hash(x) -> int:
    """Same value in every process (Python's str hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(x).encode(), digest_size=7).digest(), "little")


class _GatherSequence(torch.autograd.Function):
    """All-gather shards into the full sequence; backward keeps this rank's positions only.

    Every rank computes the same loss from the gathered output, so each rank's gradient of
    the full output is already complete: it takes its own slice, no reduction needed.
    """

    @staticmethod
    def forward(fctx, x, group, layout, rank):
        world = dist.get_world_size(group)
        shards = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(shards, x.contiguous(), group=group)
        fctx.meta = (world, rank, layout)
        return unshard_sequence(shards, layout, dim=1)

    @staticmethod
    def backward(fctx, grad):
        world, rank, layout = fctx.meta
        return shard_sequence(grad, world, rank, layout, dim=1).contiguous(), None, None, None


class _ShardSequence(torch.autograd.Function):
    """Take this rank's shard of a full sequence; backward scatters into zeros elsewhere."""

    @staticmethod
    def forward(fctx, x, world, rank, layout):
        fctx.meta = (x.shape, world, rank, layout)
        return shard_sequence(x, world, rank, layout, dim=1).contiguous()

    @staticmethod
    def backward(fctx, grad):
        shape, world, rank, layout = fctx.meta
        full = grad.new_zeros(shape)
        for p in rank_pieces(shape[1], world, rank, layout):
            full.narrow(1, p.start, p.length).copy_(grad.narrow(1, p.local_offset, p.length))
        return full, None, None, None


class RingAttentionBase(nn.Module):
    """Exact ring attention over a sequence split across a process group.

    Call: ``out = attn(q, k, v, is_causal=False, already_split=False)`` with
    q (B, T, H, D), k/v (B, T, K, D), ``H % K == 0``. See docs/ARCHITECTURE.md.
    """

    variant = "standard"

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
        self._group = _UNSET  # set_process_group's group, for standalone use only
        self._verified = set()
        self.profiler = RingProfiler()
        self.pool = BufferPool(config.max_buffer_size_mb * 2**20, config.enable_memory_pool)
        self._comm: Optional[RingComm] = None

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
        one is initialised (the usage guide's multi-GPU example), else one device.
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

    # ------------------------------------------------------------------- variants
    def _context_options(self, q: torch.Tensor, seq_len: int, is_causal: bool) -> dict:
        """Variant hook: extra RingContext fields (path, tile, compute_dtype, grad_check...)."""
        return {}

    def _sparse_key(self) -> Optional[tuple]:
        """Variant hook: (block_size, pattern, ratio, seed) of a block mask the plan must honour."""
        return None

    def _restrict_plan(self, plan):
        """Variant hook: the plan without the tasks its mask empties (their K/V are not sent)."""
        return plan

    def _comm_blocking(self) -> Optional[bool]:
        return None  # gloo: blocking with timeout; NCCL: stream-ordered waits

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
        """forward() on (B, T, H, D) inputs."""
        self._check_inputs(q, k, v)
        active = active_sequence_sharding()
        if already_split and active is not None and active.ulysses_group is not None:
            return ulysses_attention(self, q, k, v, active, is_causal, return_lse, document_ids)  # hybrid
        cfg = self.config
        group, active_layout = self._sharding()
        world = 1 if group is None else dist.get_world_size(group)
        if cfg.ring_size is not None and cfg.ring_size != world:
            raise ValueError(
                f"ring_size={cfg.ring_size} but the sequence-parallel group has {world} ranks; "
                f"set ring_size=None or {world}"
            )
        if world == 1:
            layout, rank = "contiguous", 0
            seq_len = q.shape[1]
        elif not already_split and active_layout is not None:
            raise ValueError(
                "a sequence sharding is active (RingStrategy shards every batch along the sequence), "
                "so each rank holds a shard: call the attention with already_split=True"
            )
        elif already_split:
            layout = active_layout or (cfg.layout if cfg.layout != "auto" else "contiguous")
            if cfg.layout not in ("auto", layout):
                raise ValueError(
                    f"the batch is sharded with layout={layout!r} but this module's config says "
                    f"layout={cfg.layout!r}; leave config.layout='auto' (the sharder decides) or pass "
                    f"RingStrategy(layout={cfg.layout!r})"
                )
            rank = dist.get_rank(group)
            seq_len = q.shape[1] * world
        else:
            seq_len = q.shape[1]
            layout = self.preferred_layout(seq_len, world, is_causal)
            rank = dist.get_rank(group)
        # every rule on the length at once (layout, segments, block mask): one message, lengths.py
        check_length(seq_len, cfg.length_rules(world, layout, self.variant))
        patterns = tuple(cfg.patterns(seq_len))
        if document_ids is not None:
            check_document_ids(document_ids, q)
        if world == 1 and not return_lse:
            if document_ids is None and self._fused_single_device(q, patterns, seq_len, is_causal):
                return self._single_device_sdpa(q, k, v, is_causal)
            if self._flex_single_device(q, patterns, seq_len, is_causal, document_ids is not None):
                return self._single_device_flex(q, k, v, is_causal, seq_len, document_ids)
        H, K = q.shape[2], k.shape[2]
        plan = get_plan(seq_len, world, layout, patterns, bool(is_causal), H, K, self._sparse_key(),
                        active.head_offset if active is not None else 0)  # global heads (ulysses.py)
        plan = self._restrict_plan(plan)
        comm = None
        if world > 1:
            if self._comm is None or self._comm.group is not group:
                self._comm = RingComm(group, cfg.comm_timeout_s, cfg.custom_ring_order, self._comm_blocking())
            comm = self._comm
            self._verify_across_ranks(comm, q, k, seq_len, layout, is_causal, already_split,
                                      document_ids is not None)
        docs = None
        if document_ids is not None:  # tasks and transfers of pieces sharing no document are dropped
            docs = documents_for(document_ids, group, layout, world, already_split)
            plan = DocumentPlan(plan, docs)
        if not already_split and world > 1:
            q, k, v = (_ShardSequence.apply(x, world, rank, layout) for x in (q, k, v))

        self.profiler.reset(q.device, cfg.profile_memory)
        self.profiler.calls += 1
        ctx = RingContext(
            plan=plan, comm=comm,
            scale=cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(q.shape[-1]),
            profiler=self.profiler, pool=self.pool, kernel=cfg.kernel,
            dropout_p=cfg.dropout if self.training else 0.0,
            dropout_seed=int(torch.randint(0, 2**62, (1,)).item()) if (self.training and cfg.dropout > 0) else 0,
            async_comm=cfg.async_ring_communication, sync_profiling=cfg.enable_profiling,
            profile_communication=cfg.profile_communication, device=q.device, documents=docs,
            **{"tile": cfg.compute_block_size, **self._context_options(q, seq_len, is_causal)},
        )
        with self.profiler.total.span():
            out, lse = RingAttentionFunction.apply(q, k, v, ctx)
        if cfg.log_communication_stats and comm is not None:
            log.info("ring %s rank %d: sent %.2f MB in %d steps, waited %.2f ms (forward)", self.variant,
                     comm.rank, self.profiler.bytes_sent / 2**20, self.profiler.ring_steps,
                     self.profiler.comm.ms())
        if cfg.aggressive_memory_cleanup:
            self.clear_memory_pool()
        if not already_split and world > 1:
            out = _GatherSequence.apply(out, group, layout, rank)
            lse = _GatherSequence.apply(lse, group, layout, rank) if return_lse else lse
        return (out, lse) if return_lse else out

    # ------------------------------------------------------------ one device, fused
    def _fused_single_device(self, q, patterns, seq_len: int, is_causal: bool) -> bool:
        """One CUDA device, dense pattern, nothing variant-specific: the fused SDPA kernel alone.

        The ring's general path (a plan, a float32 accumulator, kv heads expanded for GQA)
        costs about 4% at 128K tokens on one H200 for the same numbers (to bf16 rounding):
        benchmarks/bench_model.py's attention rows. A variant that changes the computation
        (masks, order, mixed precision, gradient checks) returns options and keeps the ring.
        """
        return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and self._plain_dense(q, patterns,
                                                                                            seq_len, is_causal)

    def _plain_dense(self, q, patterns, seq_len: int, is_causal: bool) -> bool:
        """Dense pattern, automatic kernel, no dropout in training, and nothing variant-specific
        (the variant's options are at most a path that computes what SDPA computes)."""
        cfg = self.config
        opts = self._context_options(q, seq_len, is_causal)
        plain_path = opts.get("path", TaskPath()).fused_equivalent
        return (cfg.kernel == "auto" and patterns == ((seq_len, 1),) and (cfg.dropout == 0.0 or not self.training)
                and self._sparse_key() is None and plain_path and set(opts) <= {"path"})

    def _flex_grid(self, seq_len: int, device) -> Optional[tuple]:
        """Variant hook: ``(key, block_size, make_blocks)`` of a block grid FlexAttention can take
        (``make_blocks()`` -> (N/bs, N/bs) bool on ``device``, called only to build a mask)."""
        return None

    def _flex_single_device(self, q, patterns, seq_len: int, is_causal: bool, documents: bool) -> bool:
        """One CUDA device, dense pattern, a mask FlexAttention can express (documents, a block
        grid), nothing else variant-specific: FlexAttention alone (flex.py)."""
        cfg = self.config
        if not flex_supported(q) or cfg.kernel != "auto" or patterns != ((seq_len, 1),):
            return False
        grid = self._flex_grid(seq_len, q.device) is not None
        if not (documents or grid) or (cfg.dropout > 0.0 and self.training):
            return False
        opts = self._context_options(q, seq_len, is_causal)
        return set(opts) <= {"path", "tile"} and (opts.get("path", TaskPath()).fused_equivalent or grid)

    def _single_device_flex(self, q, k, v, is_causal, seq_len, document_ids) -> torch.Tensor:
        self.profiler.reset(q.device, self.config.profile_memory)
        self.profiler.calls += 1
        scale = self.config.scale if self.config.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        with self.profiler.total.span(), self.profiler.compute.span():
            mask = flex_block_mask(seq_len, bool(is_causal), q.device, self._flex_grid(seq_len, q.device),
                                   document_ids)
            return flex_attention(q, k, v, scale, mask)

    def _single_device_sdpa(self, q, k, v, is_causal: bool) -> torch.Tensor:
        self.profiler.reset(q.device, self.config.profile_memory)
        self.profiler.calls += 1
        scale = self.config.scale if self.config.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        with self.profiler.total.span(), self.profiler.compute.span():
            out = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H|K, T, D) views
                is_causal=bool(is_causal), scale=scale, enable_gqa=k.shape[2] != q.shape[2])
        return out.transpose(1, 2)  # (B, H, T, D) -> (B, T, H, D)

    # ---------------------------------------------------------------------- checks
    def _check_inputs(self, q, k, v) -> None:
        check_qkv(q, k, v)

    def _verify_across_ranks(self, comm, q, k, seq_len, layout, is_causal, already_split, documents) -> None:
        """Once per input signature: every rank of the group must agree (one all_gather)."""
        cfg = self.config
        sig = (tuple(q.shape), tuple(k.shape), str(q.dtype), layout, bool(is_causal), bool(already_split),
               self.variant, tuple(cfg.patterns(seq_len)), cfg.block_size, cfg.sparsity_ratio,
               cfg.sparse_pattern, cfg.sparse_seed, tuple(cfg.custom_ring_order or ()),
               cfg.async_ring_communication, cfg.scale, cfg.dropout, bool(documents),
               (tuple(cfg.grid_shape or ()), tuple(cfg.grid_window or ()), cfg.grid_order))
        if sig in self._verified:
            return
        names = ["shape q", "shape k", "dtype", "layout", "is_causal", "already_split", "variant",
                 "patterns", "block_size", "sparsity_ratio", "sparse_pattern", "sparse_seed",
                 "custom_ring_order", "async_ring_communication", "scale", "dropout", "document_ids given", "grid"]
        codes = torch.tensor([_stable_hash(x) for x in sig], dtype=torch.int64,
                             device=q.device if comm.backend == "nccl" else "cpu")
        gathered = [torch.empty_like(codes) for _ in range(comm.world)]
        work = dist.all_gather(gathered, codes, group=comm.group, async_op=True)
        try:
            work.wait(timeout=comm.timeout) if comm.backend != "nccl" else work.wait()
        except Exception as exc:
            raise comm.error([r for r in range(comm.world) if r != comm.rank], 0, exc) from exc
        mine = codes.tolist()
        for r, other in enumerate(gathered):
            diff = [n for n, a, b in zip(names, mine, other.tolist()) if a != b]
            if diff:
                raise ValueError(
                    f"rank {comm.rank} and rank {r} of the sequence-parallel group called ring attention "
                    f"with different {', '.join(diff)} (this rank: {[sig[names.index(d)] for d in diff]}). "
                    f"Every rank must pass shards of the same length and use the same config."
                )
        self._verified.add(sig)

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
