"""SequenceParallel: what a sequence-parallel strategy does, whatever wraps the model.

``RingStrategy`` (ring_lightning/parallel/strategy.py) is a DDP shell around one of these; a strategy
that shards the model instead (FSDP2) wraps the same core. The core owns:

* the parallel shape (:class:`~ring_lightning.sequence.dims.ParallelDims`, given by the shell
  once the world is known) and the ``(dp, sp)`` device mesh and the hybrid's groups built on it;
* the sampler's arguments (dp only: every rank of a sequence group reads the same sample);
* batch sharding: each dict batch split along the sequence (dim 1) with the layout the
  attention modules prefer, global ``position_ids`` added, the labels aligned, and one
  :class:`~ring_lightning.parallel.step.BatchShard` made for the batch;
* the loss contract (``ring_lightning.parallel.loss_contract``): the batch's scale applied in backward,
  ``reduce_token_loss`` as the explicit path, the exact group loss logged;
* the shard context around every step (forward and backward);
* the ring-usage checks (``ring_lightning.parallel.ring_usage``): no silent local attention under sp > 1.

Letters: B batch, N global sequence length, T local sequence length (N / sp).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ring_lightning.parallel import loss_contract

from ring_lightning.parallel import ring_usage
from ring_lightning.constants import DEFAULT_SEQUENCE_KEYS
from ring_lightning.parallel.step import UNSHARDED, BatchShard
from ring_lightning.sequence import groups, sharding
from ring_lightning.sequence.dims import MESH_AXES, ParallelDims

DP_AXIS, SP_AXIS = MESH_AXES
#: Logged each training step for a module that returns its shard's mean: the exact loss of the group's samples.
GROUP_LOSS_KEY = "train/group_loss"


class SequenceParallel:
    """The sequence-parallel part of a strategy (see the module docstring).

    Args:
        loss_reduction, shift_labels, label_key, ignore_index: the loss contract
            (``RingStrategy`` documents them); validated by the shell.
    """

    def __init__(self, loss_reduction: str, shift_labels: Optional[bool], label_key: str, ignore_index: int) -> None:
        self.loss_reduction, self.shift_labels = loss_reduction, shift_labels
        self.label_key, self.ignore_index = label_key, ignore_index
        self.dims: Optional[ParallelDims] = None  # set by build(), once the world exists
        self.mesh: Optional[DeviceMesh] = None
        self._hybrid: Optional[groups.HybridGroups] = None  # built with the mesh when U > 1
        self.ring_modules: List[nn.Module] = []
        self.batch: BatchShard = UNSHARDED  # the batch being stepped (shard() makes a new one)
        self._ring_calls_unchecked = True  # until the first training step has shown ring calls
        self._label_checks_left = 4  # batches whose labels are compared with the inputs
        self._layout_by_len: Dict[int, str] = {}
        self._previous_default: Optional[sharding.SequenceSharding] = None

    # ------------------------------------------------------------------ mesh
    def build(self, dims: ParallelDims, device_type: str) -> DeviceMesh:
        """The ``(dp, sp)`` mesh and the hybrid's groups (collective: every rank calls it alike)."""
        self.dims = dims
        # init_device_mesh lays ranks out row-major: row d of the (dp, sp) grid is ranks
        # [d*sp, (d+1)*sp), so a sequence group is consecutive ranks (one node, fast links).
        self.mesh = init_device_mesh(device_type, dims.mesh_shape, mesh_dim_names=MESH_AXES)
        self._hybrid = groups.build_hybrid_groups(dims.world, dims.sp, dims.ulysses)
        self.batch = BatchShard(self._sharding("contiguous"))
        return self.mesh

    def group(self, axis: str) -> dist.ProcessGroup:
        if self.mesh is None:
            raise RuntimeError("the (dp, sp) device mesh is built in setup_environment(); it does not exist yet")
        return self.mesh.get_group(axis)

    def _sharding(self, layout: str) -> sharding.SequenceSharding:
        """What the attention reads for a batch in ``layout``: nothing split at sp=1."""
        if self.dims is None or not self.dims.splits_sequence:
            return sharding.NOTHING_SPLIT
        hybrid = () if self._hybrid is None else (self._hybrid.ulysses, self._hybrid.ring)
        return sharding.SequenceSharding(self.group(SP_AXIS), layout, *hybrid)

    # ------------------------------------------------------------------ model
    def prepare(self, module: nn.Module, sp: int) -> None:
        """At setup: find the ring attention; sp > 1 without it is an error (``ring_usage``).
        Outside a step nothing is split: attention there (callbacks, summaries) runs locally."""
        self.ring_modules = ring_usage.prepare_ring_attention(module)
        message = ring_usage.missing_ring_message(module, sp, self.ring_modules)
        if message is not None:
            ring_usage.raise_once(message)  # every rank finds it; rank 0 says it
        self._previous_default = sharding.set_default_sequence_sharding(sharding.NOTHING_SPLIT)

    def teardown(self) -> None:
        sharding.set_default_sequence_sharding(self._previous_default)

    @contextmanager
    def in_step(self) -> Iterator[BatchShard]:
        """The current batch's sharding, for every ring attention call inside (forward, and
        backward: activation checkpointing calls attention again while recomputing)."""
        batch = self.batch
        with sharding.use_sequence_sharding(batch.sharding):
            yield batch

    def training_step(self, run: Callable[[], Any], module: Any, batch: Any, sp: int) -> Any:
        """``run()`` (the shell's training step) inside the batch's sharding; the first step under
        sp > 1 must have called the ring (``ring_usage``); then the group loss is logged."""
        audit = self._ring_calls_unchecked and sp > 1
        before = ring_usage.ring_calls(self.ring_modules) if audit else 0
        with self.in_step():
            out = run()
        if audit:
            self._ring_calls_unchecked = False
            ring_usage.check_ring_called(module, self.ring_modules, before, sp)
        self._log_group_loss(module, out, batch, sp)
        return out

    # ------------------------------------------------------------------ data
    def layout_for(self, dims: ParallelDims, seq_len: int, module: Any) -> str:
        """The layout for global length ``seq_len``: ``ParallelDims.layout_for`` (the policy's) of
        what every ring module prefers, asked only when the policy is ``auto`` and the sequence split."""
        if dims.layout != "auto" or not dims.splits_sequence:
            return dims.layout_for("contiguous")  # the fixed layout, or contiguous on one rank
        if seq_len not in self._layout_by_len:
            is_causal = getattr(module, "is_causal", True)
            prefs = {m.preferred_layout(seq_len, dims.ring, is_causal=is_causal) for m in self.ring_modules}
            if len(prefs) > 1:
                raise ValueError(
                    f"the ring attention modules prefer different layouts {sorted(prefs)} for sequence "
                    f"length {seq_len}; one batch has one layout. Pass RingStrategy(layout=...) with one "
                    f"of {sharding.LAYOUTS}."
                )
            self._layout_by_len[seq_len] = prefs.pop() if prefs else "contiguous"
        return dims.layout_for(self._layout_by_len[seq_len])

    def shard(self, batch: Any, dims: ParallelDims, global_rank: int, module: Any) -> Any:
        """This rank's shard of a dict batch (the module's ``sequence_keys`` along dim 1), plus
        global ``position_ids`` (B, T) when absent, also with sp=1; makes the batch's
        :class:`BatchShard`. Raises ValueError: see ``sharding.sequence_entries``; a length the
        layout cannot split."""
        keys = tuple(getattr(module, "sequence_keys", DEFAULT_SEQUENCE_KEYS))
        sp, rank = dims.sp, dims.sp_rank(global_rank)
        entries = sharding.sequence_entries(batch, keys, sp)
        if entries is None:
            self.batch = BatchShard(self._sharding("contiguous"))
            return batch
        present, seq_len = entries
        # After the user's transfer hooks, so labels made there are covered too. Comparing
        # labels with inputs synchronises: only the first batches are compared.
        batch = loss_contract.align_labels(batch, sp, self.shift_labels, self.label_key, self.ignore_index,
                                           check=self._label_checks_left > 0)
        self._label_checks_left -= 1
        layout = self.layout_for(dims, seq_len, module)
        sharding.check_divisible(seq_len, sp, layout)
        ref = batch[present[0]]
        positions = sharding.sequence_positions(seq_len, sp, rank, layout, device=ref.device)
        # Training batches are sharded right before their step, so the last sharded batch is
        # the one backward() reads (validation batches run no backward).
        self.batch = BatchShard(self._sharding(layout), layout, seq_len, positions, loss_contract.loss_scale(
            batch, sp, rank, layout, self.loss_reduction, self.label_key, self.ignore_index))
        out = dict(batch)
        for k in present:
            out[k] = sharding.shard_sequence(batch[k], sp, rank, layout, dim=1)
        if not isinstance(batch.get("position_ids"), Tensor):
            out["position_ids"] = positions.unsqueeze(0).expand(ref.shape[0], -1).contiguous()  # (B, T)
        return type(batch)(out) if type(batch) is not dict else out

    # ------------------------------------------------------------------ loss
    def scale_for_backward(self, closure_loss: Tensor) -> Tensor:
        """``closure_loss`` times the batch's loss scale (``loss_contract``), unless final."""
        scale = self.batch.backward_scale
        return closure_loss if scale is None else closure_loss * scale

    def reduce_token_loss(self, loss_sum: Tensor, num_tokens: Union[Tensor, int], sp: int) -> Tuple[Tensor, Tensor]:
        """``loss_contract.reduce_token_loss`` over the sequence group; marks the batch's loss final."""
        self.batch = self.batch.with_final_loss()
        return loss_contract.reduce_token_loss(loss_sum, num_tokens, sp, self.group(SP_AXIS) if sp > 1 else None)

    def _log_group_loss(self, module: Any, out: Any, batch: Any, sp: int) -> None:
        """Log ``train/group_loss``: the per-token mean over the whole samples of this rank's
        sequence group, what one device computes on them, for a module that returns its own
        shard's mean (``loss_reduction="mean"``). Rank r's mean ``L_r`` times its scale
        ``sp * n_r / n``, summed over the group and divided by sp, is ``sum_r L_r n_r / n``
        (one all-reduce of a scalar per step). A module that reduces its loss itself
        (``reduce_token_loss``, as LongDocumentLM does) logs the exact value already."""
        facts = self.batch
        if facts.loss_final or self.loss_reduction != "mean" or module is None:
            return
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        value, scale = loss.detach().float().reshape(()), facts.loss_scale
        if scale is not None:  # a shard with no labelled token: its mean is nan, its share 0
            value = torch.where(torch.as_tensor(scale, device=value.device) == 0, torch.zeros_like(value),
                                value * scale)
        if sp > 1:
            value = value / sp
            dist.all_reduce(value, group=self.group(SP_AXIS))
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        module.log(GROUP_LOSS_KEY, value, prog_bar=True, batch_size=ids.shape[0] if isinstance(ids, Tensor) else 1)
