"""RingStrategy: sequence parallelism for Lightning on a (dp, sp) device mesh.

The world is a 2-D mesh of ``dp x sp`` ranks; consecutive ranks form one *sequence
group* (``sp`` axis) that holds one sample split along the sequence, and the groups
are data-parallel replicas (``dp`` axis). The strategy

* builds the mesh right after the default process group exists,
* runs the distributed sampler over ``dp`` only, so every rank of a sequence group
  reads the same sample,
* shards each dict batch along the sequence (dim 1) after it reaches the device, with
  the layout the attention modules prefer, and adds global ``position_ids``,
* runs every step (forward and backward) inside ``sharding.sequence_sharding(sp_group,
  layout)``, which the ring attention modules read: nothing is pushed into them,
* rescales the loss each rank returns so that DDP's average over the whole world is
  the ``sp=1`` gradient for the per-token mean users write (``ring_lightning.loss_contract``;
  :meth:`RingStrategy.reduce_token_loss` is the explicit alternative), and logs that mean
  over the sequence group, the one-device loss, as ``train/group_loss``,
* registers a gradient-compression DDP hook (``ring_lightning.compression``).

Usage::

    trainer = Trainer(strategy=RingStrategy(sequence_parallel_size=2), devices=4)  # dp=2 x sp=2
    trainer = Trainer(strategy="ring", devices=8)  # "auto": every device of a node in one group
    RingStrategy(sequence_parallel_size=8, ulysses_size=4)  # all-to-all over heads x a ring of 2

The name ``"ring"`` is registered when this module is imported (``from ring_lightning
import RingStrategy`` does it).

Labels must be aligned per position BEFORE sharding; ``ring_lightning.loss_contract`` says
why, and what happens to labels equal to ``input_ids`` (refused, or ``shift_labels=True``).

Letters: B batch, N global sequence length, T local sequence length (N / sp).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ring_lightning import loss_contract, ring_usage, sharding, sequence_groups
from ring_lightning.compression import check_compression_args, register_compression_hook, resolve_compression
from ring_lightning.compression_checkpoint import CHECKPOINT_KEY as COMPRESSION_CHECKPOINT_KEY
from ring_lightning.compression_checkpoint import gather_compression_state, restore_compression_state, this_rank_state
from ring_lightning.constants import DEFAULT_SEQUENCE_KEYS, IGNORE_INDEX

#: Mesh axes, outer to inner. Ranks ``[d*sp, (d+1)*sp)`` form sequence group ``d``.
MESH_AXES: Tuple[str, str] = ("dp", "sp")
DP_AXIS, SP_AXIS = MESH_AXES
LAYOUT_CHOICES = ("auto",) + sharding.LAYOUTS
#: Logged each training step for a module that returns its shard's mean: the exact loss of the group's samples.
GROUP_LOSS_KEY = "train/group_loss"


def _within_batch_sharding(hook: str):
    """``DDPStrategy.<hook>`` run inside the current batch's ``sharding.sequence_sharding``."""

    def step(self: "RingStrategy", *args: Any, **kwargs: Any) -> Any:
        with self._batch_sharding():
            return getattr(DDPStrategy, hook)(self, *args, **kwargs)

    step.__name__ = step.__qualname__ = hook
    return step


class RingStrategy(DDPStrategy):
    """DDP over a ``(dp, sp)`` mesh with sequence sharding and ring attention wiring.

    A model without any ring attention module while ``sequence_parallel_size > 1`` is
    an error, not a warning: every rank would attend only to its own shard and training
    would run on silently wrong numbers. So are a Hugging Face model left on ``sdpa`` /
    ``eager`` and a first training step that called no ring core (``ring_lightning.ring_usage``).

    Args:
        sequence_parallel_size: ranks per sequence group (``sp``), or ``"auto"`` (the default):
            every device of a node (1 on one device, so a single GPU or CPU runs plain
            single-device attention). An explicit size must divide the world size.
        compression: gradient compression, one of ``none | topk | randomk | powersgd | bf16``.
            ``"none"`` also lets a ``distributed`` ring attention module's
            ``config.compression_method`` choose.
        compression_ratio: fraction of gradient entries ``topk``/``randomk`` send, in ``(0, 1]``.
        powersgd_rank: matrix approximation rank of ``powersgd``.
        error_feedback: carry the compression error over to the next step.
        powersgd_start_iter: plain all-reduce steps before PowerSGD starts (>= 2).
        layout: ``"auto"`` (ask the attention modules, per sequence length) or a fixed
            ``"contiguous"`` / ``"zigzag"``.
        ulysses_size: U, ranks of a sequence group that trade sequence for heads with an
            all-to-all before the ring (``sequence_groups``); divides ``sequence_parallel_size``
            and the heads. 1 (default): the ring alone; ``sequence_parallel_size``: Ulysses alone.
        loss_reduction: what the module's ``training_step`` returns, so the strategy can
            make the gradient equal ``sp=1`` (``ring_lightning.loss_contract``): ``"mean"``
            (per-token mean over labels != ``ignore_index``, the default), ``"sum"`` (sum of
            token losses), ``"none"`` (already reduced over the sequence group; leave it).
        shift_labels: ``None`` (default): refuse labels equal to ``input_ids`` when sp > 1;
            ``True``: shift them before sharding (``labels[t] = labels[t+1]``, last ignored);
            ``False``: trust the labels as aligned per position.
        label_key: the batch entry holding the labels.
        ignore_index: label value of positions without loss.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy`
            (``accelerator``, ``cluster_environment``, ``process_group_backend``,
            ``timeout``, ``start_method``, DDP kwargs such as ``find_unused_parameters``...).

    Raises:
        ValueError: an argument outside its valid values (message names it); at setup,
            a world size not divisible by ``sequence_parallel_size`` or a model without
            ring attention while ``sequence_parallel_size > 1``; at the first batch of a
            sequence length the layout cannot split.
    """

    strategy_name = "ring"

    def __init__(
        self,
        sequence_parallel_size: Union[int, str] = "auto",
        compression: str = "none",
        compression_ratio: float = 0.1,
        powersgd_rank: int = 1,
        error_feedback: bool = True,
        powersgd_start_iter: int = 2,
        layout: str = "auto",
        ulysses_size: int = 1,
        loss_reduction: str = "mean",
        shift_labels: Optional[bool] = None,
        label_key: str = "labels",
        ignore_index: int = IGNORE_INDEX,
        **kwargs: Any,
    ) -> None:
        if sequence_parallel_size != "auto" and (
            isinstance(sequence_parallel_size, bool) or not isinstance(sequence_parallel_size, int)
            or sequence_parallel_size < 1
        ):
            raise ValueError(
                f"sequence_parallel_size must be 'auto' or an int >= 1, got {sequence_parallel_size!r}"
            )
        if loss_reduction not in loss_contract.LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction={loss_reduction!r} is not valid; valid values: {loss_contract.LOSS_REDUCTIONS}"
            )
        if shift_labels not in (None, True, False):
            raise ValueError(f"shift_labels must be None, True or False, got {shift_labels!r}")
        check_compression_args(compression, compression_ratio, powersgd_rank)
        sequence_groups.check_ulysses_size(ulysses_size, sequence_parallel_size)
        if layout not in LAYOUT_CHOICES:
            raise ValueError(f"layout={layout!r} is not valid; valid values: {LAYOUT_CHOICES}")
        if compression != "none" and kwargs.get("ddp_comm_hook") is not None:
            raise ValueError("pass either compression=... or ddp_comm_hook=..., not both: DDP takes one hook")
        super().__init__(**kwargs)
        self._sp_request = sequence_parallel_size
        self.loss_reduction, self.shift_labels = loss_reduction, shift_labels
        self.label_key, self.ignore_index = label_key, ignore_index
        self._loss_scale: Any = None  # of the last sharded batch; applied in backward()
        self._loss_reduced_by_module = False  # reduce_token_loss() was called for this batch
        self._label_checks_left = 4  # batches whose labels are compared with the inputs
        self.compression = compression
        self.target_compression_ratio = compression_ratio
        self.powersgd_rank = powersgd_rank
        self.error_feedback = error_feedback
        self.powersgd_start_iter = powersgd_start_iter
        self.layout, self.ulysses_size = layout, ulysses_size
        self._device_mesh: Optional[DeviceMesh] = None
        self._hybrid: Optional[sequence_groups.HybridGroups] = None  # built with the mesh when U > 1
        self._ring_modules: List[nn.Module] = []
        self._ring_calls_unchecked = True  # until the first training step has shown ring calls
        self._batch_layout = "contiguous"  # of the last sharded batch, read by _batch_sharding()
        self._layout_by_len: Dict[int, str] = {}
        self._compression_state: Any = None
        self._compression_resume: Optional[tuple] = None  # this rank's saved hook state, until the hook exists

    # ------------------------------------------------------------------ mesh

    @property
    def sequence_parallel_size(self) -> int:
        """Ranks per sequence group: the explicit size, or with ``"auto"`` the devices per node."""
        if self._sp_request == "auto":
            return max(1, self.num_processes)  # Lightning's devices on this node
        return self._sp_request

    @property
    def sp_size(self) -> int:
        """Ranks per sequence group."""
        return self.sequence_parallel_size

    @property
    def dp_size(self) -> int:
        """Number of sequence groups (data-parallel replicas)."""
        return self.world_size // self.sequence_parallel_size

    @property
    def sp_rank(self) -> int:
        """This rank's index inside its sequence group (consecutive ranks: global % sp)."""
        return self.global_rank % self.sequence_parallel_size

    @property
    def dp_rank(self) -> int:
        """Index of this rank's sequence group."""
        return self.global_rank // self.sequence_parallel_size

    @property
    def device_mesh(self) -> DeviceMesh:
        """The ``(dp, sp)`` mesh; exists once the process group is set up."""
        if self._device_mesh is None:
            raise RuntimeError("RingStrategy.device_mesh is built in setup_environment(); it does not exist yet")
        return self._device_mesh

    @property
    def sp_group(self) -> dist.ProcessGroup:
        """The process group of this rank's sequence group (ring attention runs in it)."""
        return self.device_mesh.get_group(SP_AXIS)

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The ranks holding the same sequence positions of different samples.

        Reduce over it (not the world) to sum a value that is already identical across a
        sequence group, e.g. the logging loss of :meth:`reduce_token_loss`.
        """
        return self.device_mesh.get_group(DP_AXIS)

    def setup_distributed(self) -> None:
        # Check before init_process_group: every rank fails the same way, nobody waits.
        sp = self.sequence_parallel_size
        sequence_groups.check_world_size(self.num_nodes * self.num_processes, sp)
        sequence_groups.check_ulysses_size(self.ulysses_size, sp)  # sp known now, also under "auto"
        super().setup_distributed()
        world = dist.get_world_size()
        sequence_groups.check_world_size(world, sp)
        # init_device_mesh lays ranks out row-major: row d of the (dp, sp) grid is ranks
        # [d*sp, (d+1)*sp), so a sequence group is consecutive ranks (one node, fast links).
        self._device_mesh = init_device_mesh(self.root_device.type, (world // sp, sp), mesh_dim_names=MESH_AXES)
        assert self._device_mesh[SP_AXIS].get_local_rank() == self.sp_rank
        assert self._device_mesh[DP_AXIS].get_local_rank() == self.dp_rank
        self._hybrid = sequence_groups.build_hybrid_groups(world, sp, self.ulysses_size)

    def setup_environment(self) -> None:
        super().setup_environment()
        module = self.lightning_module
        if module is not None and hasattr(module, "_device_mesh"):
            # LightningModule.device_mesh is a read-only property over _device_mesh.
            module._device_mesh = self._device_mesh

    @property
    def distributed_sampler_kwargs(self) -> Dict[str, Any]:
        # The sampler runs over dp only: all ranks of a sequence group read the same sample.
        return {"num_replicas": self.dp_size, "rank": self.dp_rank}

    # ------------------------------------------------------------------ model

    def setup(self, trainer: Any) -> None:
        self._check_ring_modules()
        # Outside a step nothing is split: attention there (callbacks, summaries) runs locally.
        self._previous_default = sharding.set_default_sequence_sharding(sharding.SequenceSharding(None))
        super().setup(trainer)

    def teardown(self) -> None:
        sharding.set_default_sequence_sharding(getattr(self, "_previous_default", None))
        super().teardown()

    def _check_ring_modules(self) -> None:
        """sp > 1 needs ring attention in the model (else silently wrong results): ``ring_usage``."""
        assert self.lightning_module is not None
        self._ring_modules = ring_usage.prepare_ring_attention(self.lightning_module)
        message = ring_usage.missing_ring_message(self.lightning_module, self.sequence_parallel_size,
                                                  self._ring_modules)
        if message is not None:
            ring_usage.raise_once(message)  # every rank finds it; rank 0 says it

    @property
    def sequence_layout(self) -> str:
        """The layout of the last sharded batch (``contiguous`` before any, or with sp=1)."""
        return self._batch_layout

    def _batch_sharding(self):
        """The sharding every ring attention call of this step reads (``sharding.sequence_sharding``)."""
        group = self.sp_group if self.sequence_parallel_size > 1 else None
        hybrid = () if self._hybrid is None else (self._hybrid.ulysses, self._hybrid.ring)
        return sharding.sequence_sharding(group, self._batch_layout, *hybrid)

    # Forward and backward of each step run inside the batch's sharding (backward too, see
    # backward(): activation checkpointing calls attention again while recomputing).
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        # The first step under sp > 1 must have called the ring (ring_usage: no silent local attention).
        audit = self._ring_calls_unchecked and self.sequence_parallel_size > 1
        before = ring_usage.ring_calls(self._ring_modules) if audit else 0
        with self._batch_sharding():
            out = DDPStrategy.training_step(self, *args, **kwargs)
        if audit:
            self._ring_calls_unchecked = False
            ring_usage.check_ring_called(self.lightning_module, self._ring_modules, before,
                                         self.sequence_parallel_size)
        self._log_group_loss(out, args[0] if args else None)
        return out

    validation_step = _within_batch_sharding("validation_step")
    test_step = _within_batch_sharding("test_step")
    predict_step = _within_batch_sharding("predict_step")

    def _layout_for(self, seq_len: int) -> str:
        """The layout for global length ``seq_len``: fixed, or what every module prefers."""
        if self.layout != "auto":
            return self.layout
        if seq_len not in self._layout_by_len:
            is_causal = getattr(self.lightning_module, "is_causal", True)
            ring = self.sequence_parallel_size // self.ulysses_size  # the ranks the ring runs over
            prefs = {m.preferred_layout(seq_len, ring, is_causal=is_causal) for m in self._ring_modules}
            if len(prefs) > 1:
                raise ValueError(
                    f"the ring attention modules prefer different layouts {sorted(prefs)} for sequence "
                    f"length {seq_len}; one batch has one layout. Pass RingStrategy(layout=...) with one "
                    f"of {sharding.LAYOUTS}."
                )
            self._layout_by_len[seq_len] = prefs.pop() if prefs else "contiguous"
        return self._layout_by_len[seq_len]

    # ------------------------------------------------------------------ data

    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        batch = super().batch_to_device(batch, device, dataloader_idx)
        return self.shard_batch(batch)

    def shard_batch(self, batch: Any) -> Any:
        """This rank's shard of a dict batch (the module's ``sequence_keys`` along dim 1), plus
        global ``position_ids`` (B, T) when absent, also with sp=1. Per-token outputs are shards
        too: ``sharding.gather_sequence(x, strategy.sp_group, strategy.sequence_layout)``.

        Raises:
            ValueError: see ``sharding.sequence_entries``; a length the layout cannot split.
        """
        keys = tuple(getattr(self.lightning_module, "sequence_keys", DEFAULT_SEQUENCE_KEYS))
        entries = sharding.sequence_entries(batch, keys, self.sequence_parallel_size)
        if entries is None:
            return batch
        present, seq_len = entries
        # After the user's transfer hooks, so labels made there are covered too. Comparing
        # labels with inputs synchronises: only the first batches are compared.
        batch = loss_contract.align_labels(batch, self.sequence_parallel_size, self.shift_labels, self.label_key,
                                           self.ignore_index, check=self._label_checks_left > 0)
        self._label_checks_left -= 1
        sp, rank = self.sequence_parallel_size, self.sp_rank
        layout = self._layout_for(seq_len) if sp > 1 else "contiguous"
        sharding.check_divisible(seq_len, sp, layout)
        self._batch_layout = layout
        # Training batches are sharded right before their step, so the scale of the last
        # sharded batch is the one backward() needs (validation batches run no backward).
        self._loss_scale = loss_contract.loss_scale(batch, sp, rank, layout, self.loss_reduction,
                                                    self.label_key, self.ignore_index)
        self._loss_reduced_by_module = False
        out = dict(batch)
        for k in present:
            out[k] = sharding.shard_sequence(batch[k], sp, rank, layout, dim=1)
        if not isinstance(batch.get("position_ids"), Tensor):
            ref = batch[present[0]]
            pos_T = sharding.sequence_positions(seq_len, sp, rank, layout, device=ref.device)
            out["position_ids"] = pos_T.unsqueeze(0).expand(ref.shape[0], -1).contiguous()  # (B, T)
        return type(batch)(out) if type(batch) is not dict else out

    # ------------------------------------------------------------------ loss

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """Backpropagate ``closure_loss`` times the batch's loss scale (``loss_contract``).

        Both automatic optimization and ``manual_backward`` come through here; the loss the
        module logs and returns is left as it is.
        """
        scale = None if self._loss_reduced_by_module else self._loss_scale
        if scale is not None:
            closure_loss = closure_loss * scale
        with self._batch_sharding():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    def _log_group_loss(self, out: Any, batch: Any) -> None:
        """Log ``train/group_loss``: the per-token mean over the whole samples of this rank's
        sequence group, what one device computes on them, for a module that returns its own
        shard's mean (``loss_reduction="mean"``). Rank r's mean ``L_r`` times its scale
        ``sp * n_r / n``, summed over the group and divided by sp, is ``sum_r L_r n_r / n``
        (one all-reduce of a scalar per step). A module that reduces its loss itself
        (``reduce_token_loss``, as LongDocumentLM does) logs the exact value already."""
        if self._loss_reduced_by_module or self.loss_reduction != "mean" or self.lightning_module is None:
            return
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        sp, scale = self.sequence_parallel_size, self._loss_scale
        value = loss.detach().float().reshape(())
        if scale is not None:  # a shard with no labelled token: its mean is nan, its share 0
            value = torch.where(torch.as_tensor(scale, device=value.device) == 0, torch.zeros_like(value),
                                value * scale)
        if sp > 1:
            value = value / sp
            dist.all_reduce(value, group=self.sp_group)
        ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
        self.lightning_module.log(GROUP_LOSS_KEY, value, prog_bar=True, batch_size=ids.shape[0] if isinstance(ids, Tensor) else 1)

    def reduce_token_loss(self, loss_sum: Tensor, num_tokens: Union[Tensor, int]) -> Tuple[Tensor, Tensor]:
        """The explicit path: ``loss_contract.reduce_token_loss`` over this rank's sequence group.

        Returns ``(loss_to_backprop, mean_loss)``; marks this batch's loss as final, so
        ``backward`` does not rescale it. To *sum* ``mean_loss`` across groups, reduce over
        :attr:`dp_group`.
        """
        self._loss_reduced_by_module = True
        sp = self.sequence_parallel_size
        return loss_contract.reduce_token_loss(loss_sum, num_tokens, sp, self.sp_group if sp > 1 else None)

    # ------------------------------------------------------------------ compression

    def _register_ddp_hooks(self) -> None:
        method, ratio, error_feedback = resolve_compression(
            self.compression, self.target_compression_ratio, self.error_feedback, self._ring_modules)
        if method == "none":
            super()._register_ddp_hooks()  # a user's own ddp_comm_hook (Lightning: CUDA only)
            return
        self._compression_state = register_compression_hook(  # over the whole (dp, sp) world, as DDP reduces
            self.model, method, process_group=None, ratio=ratio, rank=self.powersgd_rank,
            error_feedback=error_feedback, powersgd_start_iter=self.powersgd_start_iter)
        restore_compression_state(self._compression_state, self._compression_resume)
        self._compression_resume = None

    def save_checkpoint(self, checkpoint: Dict[str, Any], filepath: Any, storage_options: Optional[Any] = None) -> None:
        # Every rank's error feedback rides in the checkpoint, so a resume compresses as before.
        gathered = gather_compression_state(self._compression_state)  # a collective: every rank is here
        if gathered is not None:
            checkpoint[COMPRESSION_CHECKPOINT_KEY] = gathered
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        # Restored before the DDP hooks exist (Lightning: weights first, then setup): kept until then.
        self._compression_resume = this_rank_state(checkpoint.get(COMPRESSION_CHECKPOINT_KEY), self.global_rank)
        super().load_model_state_dict(checkpoint, strict=strict)

    @property
    def compression_ratio(self) -> float:
        """Bytes sent / bytes of the dense gradient in the last step (1.0 without compression)."""
        state = self._compression_state
        return 1.0 if state is None else state.stats.ratio


if "ring" not in StrategyRegistry:
    StrategyRegistry.register("ring", RingStrategy, description="Sequence-parallel ring attention over a (dp, sp) mesh")
