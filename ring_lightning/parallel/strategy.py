"""RingStrategy: sequence parallelism for Lightning on a (dp, sp) device mesh, over DDP.

This file is the DDP shell (DDP hooks, gradient compression, checkpoint hooks, argument
checks); the sequence-parallel work is ``ring_lightning.parallel.core.SequenceParallel``, and the
shape is ``ring_lightning.sequence.dims.ParallelDims``.

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
  the ``sp=1`` gradient for the per-token mean users write (``ring_lightning.parallel.loss_contract``;
  :meth:`RingStrategy.reduce_token_loss` is the explicit alternative), and logs that mean
  over the sequence group, the one-device loss, as ``train/group_loss``,
* registers a gradient-compression DDP hook (``ring_lightning.parallel.compression``).

Usage::

    trainer = Trainer(strategy=RingStrategy(sequence_parallel_size=2), devices=4)  # dp=2 x sp=2
    trainer = Trainer(strategy="ring", devices=8)  # "auto": every device of a node in one group
    RingStrategy(sequence_parallel_size=8, ulysses_size=4)  # all-to-all over heads x a ring of 2

The name ``"ring"`` is registered when this module is imported (``from ring_lightning
import RingStrategy`` does it).

Labels must be aligned per position BEFORE sharding; ``ring_lightning.parallel.loss_contract`` says
why, and what happens to labels equal to ``input_ids`` (refused, or ``shift_labels=True``).

Letters: B batch, N global sequence length, T local sequence length (N / sp).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from ring_lightning.parallel import loss_contract
from ring_lightning.parallel.compression import check_compression_args, register_compression_hook, resolve_compression
from ring_lightning.parallel.compression_checkpoint import CHECKPOINT_KEY as COMPRESSION_CHECKPOINT_KEY
from ring_lightning.parallel.compression_checkpoint import gather_compression_state, restore_compression_state, this_rank_state
from ring_lightning.constants import DEFAULT_SEQUENCE_KEYS, IGNORE_INDEX  # noqa: F401 (DEFAULT_SEQUENCE_KEYS re-exported)
from ring_lightning.parallel.shell import SequenceParallelShell
from ring_lightning.parallel.core import DP_AXIS, GROUP_LOSS_KEY, SP_AXIS, SequenceParallel  # noqa: F401 (re-exported)
from ring_lightning.sequence.dims import (LAYOUT_POLICIES, MESH_AXES, ParallelDims, check_layout_policy,  # noqa: F401
                                          check_sp_request, check_ulysses_size)

LAYOUT_CHOICES = LAYOUT_POLICIES


class RingStrategy(SequenceParallelShell, DDPStrategy):
    """DDP over a ``(dp, sp)`` mesh with sequence sharding and ring attention wiring.

    A model without any ring attention module while ``sequence_parallel_size > 1`` is
    an error, not a warning: every rank would attend only to its own shard and training
    would run on silently wrong numbers. So are a Hugging Face model left on ``sdpa`` /
    ``eager`` and a first training step that called no ring core (``ring_lightning.parallel.ring_usage``).

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
            all-to-all before the ring (``ring_lightning.sequence.groups``); divides ``sequence_parallel_size``
            and the heads. 1 (default): the ring alone; ``sequence_parallel_size``: Ulysses alone.
        loss_reduction: what the module's ``training_step`` returns, so the strategy can
            make the gradient equal ``sp=1`` (``ring_lightning.parallel.loss_contract``): ``"mean"``
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
        check_sp_request(sequence_parallel_size)
        if loss_reduction not in loss_contract.LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction={loss_reduction!r} is not valid; valid values: {loss_contract.LOSS_REDUCTIONS}"
            )
        if shift_labels not in (None, True, False):
            raise ValueError(f"shift_labels must be None, True or False, got {shift_labels!r}")
        check_compression_args(compression, compression_ratio, powersgd_rank)
        check_ulysses_size(ulysses_size, sequence_parallel_size)
        check_layout_policy(layout)
        if compression != "none" and kwargs.get("ddp_comm_hook") is not None:
            raise ValueError("pass either compression=... or ddp_comm_hook=..., not both: DDP takes one hook")
        super().__init__(**kwargs)
        self._sp_request = sequence_parallel_size
        self.layout, self.ulysses_size = layout, ulysses_size
        self._sequence = SequenceParallel(loss_reduction, shift_labels, label_key, ignore_index)
        self.compression = compression
        self.target_compression_ratio = compression_ratio
        self.powersgd_rank = powersgd_rank
        self.error_feedback = error_feedback
        self.powersgd_start_iter = powersgd_start_iter
        self._compression_state: Any = None
        self._compression_resume: Optional[tuple] = None  # this rank's saved hook state, until the hook exists

    # ------------------------------------------------------------------ mesh

    @property
    def device_mesh(self) -> DeviceMesh:
        """The ``(dp, sp)`` mesh; exists once the process group is set up."""
        if self._sequence.mesh is None:
            raise RuntimeError("RingStrategy.device_mesh is built in setup_environment(); it does not exist yet")
        return self._sequence.mesh

    def setup_distributed(self) -> None:
        # Check before init_process_group: every rank fails the same way, nobody waits.
        sp = self.sequence_parallel_size
        ParallelDims(self.num_nodes * self.num_processes, sp, self.ulysses_size, self.layout)
        super().setup_distributed()
        dims = ParallelDims(dist.get_world_size(), sp, self.ulysses_size, self.layout)
        self._sequence.build(dims, self.root_device.type)
        assert self.device_mesh[SP_AXIS].get_local_rank() == self.sp_rank
        assert self.device_mesh[DP_AXIS].get_local_rank() == self.dp_rank

    def setup_environment(self) -> None:
        super().setup_environment()
        module = self.lightning_module
        if module is not None and hasattr(module, "_device_mesh"):
            # LightningModule.device_mesh is a read-only property over _device_mesh, which
            # Lightning's own ModelParallelStrategy sets the same way: the public way a module
            # (configure_model) sees the mesh.
            module._device_mesh = self._sequence.mesh

    # ------------------------------------------------------------------ model and steps

    def setup(self, trainer: Any) -> None:
        assert self.lightning_module is not None
        self._sequence.prepare(self.lightning_module, self.sequence_parallel_size)
        super().setup(trainer)

    # ------------------------------------------------------------------ compression

    def _register_ddp_hooks(self) -> None:
        method, ratio, error_feedback = resolve_compression(
            self.compression, self.target_compression_ratio, self.error_feedback, self._sequence.ring_modules)
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
