"""SequenceParallelShell: the Lightning hooks every sequence-parallel strategy answers alike.

A strategy shell (``RingStrategy`` on Lightning's ``DDPStrategy``, ``RingFSDPStrategy`` on its
``ModelParallelStrategy``) subclasses this first and its Lightning strategy second: each hook
here hands the sequence-parallel part to the shell's ``SequenceParallel`` core (core.py) and
calls the Lightning strategy through ``super()``. What differs between shells (how the model
is wrapped, the process group and mesh set-up, gradient reduction, checkpoints) stays in them.

A shell sets ``self._sequence`` (a ``SequenceParallel``), ``self._sp_request``,
``self.ulysses_size`` and ``self.layout`` in its constructor.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ring_lightning.parallel.core import DP_AXIS, SP_AXIS
from ring_lightning.sequence.dims import ParallelDims


class SequenceParallelShell:
    """Shape, groups, batch sharding, the steps' shard context and the loss contract of a shell."""

    # the loss contract's settings live in the core; readable on the strategy as before
    loss_reduction = property(lambda self: self._sequence.loss_reduction)
    shift_labels = property(lambda self: self._sequence.shift_labels)
    label_key = property(lambda self: self._sequence.label_key)
    ignore_index = property(lambda self: self._sequence.ignore_index)

    # ------------------------------------------------------------------ shape and groups

    @property
    def parallel_dims(self) -> ParallelDims:
        """The parallel shape (``ParallelDims``): fixed once the process group exists; before,
        what this strategy's world and devices per node give (``"auto"`` resolved there)."""
        if self._sequence.dims is not None:
            return self._sequence.dims
        return ParallelDims.resolve(self.world_size, self.num_processes, self._sp_request, self.ulysses_size,
                                    self.layout)

    @property
    def sequence_parallel_size(self) -> int:
        """Ranks per sequence group: the explicit size, or with ``"auto"`` the devices per node."""
        if self._sequence.dims is not None:
            return self._sequence.dims.sp
        return ParallelDims.resolve_sp(self._sp_request, self.num_processes)  # Lightning's devices on this node

    @property
    def sp_size(self) -> int:
        """Ranks per sequence group."""
        return self.sequence_parallel_size

    @property
    def dp_size(self) -> int:
        """Number of sequence groups (data-parallel replicas)."""
        return self.parallel_dims.dp

    @property
    def sp_rank(self) -> int:
        """This rank's index inside its sequence group (consecutive ranks: global % sp)."""
        return self.parallel_dims.sp_rank(self.global_rank)

    @property
    def dp_rank(self) -> int:
        """Index of this rank's sequence group."""
        return self.parallel_dims.dp_rank(self.global_rank)

    @property
    def sp_group(self) -> dist.ProcessGroup:
        """The process group of this rank's sequence group (ring attention runs in it)."""
        return self._sequence.group(SP_AXIS)

    @property
    def dp_group(self) -> dist.ProcessGroup:
        """The ranks holding the same sequence positions of different samples.

        Reduce over it (not the world) to sum a value that is already identical across a
        sequence group, e.g. the logging loss of :meth:`reduce_token_loss`.
        """
        return self._sequence.group(DP_AXIS)

    @property
    def ring_attention_modules(self) -> List[nn.Module]:
        """The model's ring attention modules, found at setup."""
        return list(self._sequence.ring_modules)

    @property
    def distributed_sampler_kwargs(self) -> Dict[str, Any]:
        # The sampler runs over dp only: all ranks of a sequence group read the same sample.
        return self.parallel_dims.sampler_kwargs(self.global_rank)

    @property
    def sequence_layout(self) -> str:
        """The layout of the last sharded batch (``contiguous`` before any, or with sp=1)."""
        return self._sequence.batch.layout

    def teardown(self) -> None:
        self._sequence.teardown()
        super().teardown()

    # ------------------------------------------------------------------ steps
    # Forward and backward of each step run inside the batch's sharding (backward too:
    # activation checkpointing calls attention again while recomputing).

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        base = super()
        return self._sequence.training_step(lambda: base.training_step(*args, **kwargs), self.lightning_module,
                                            args[0] if args else None, self.sequence_parallel_size)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._sequence.in_step():
            return super().validation_step(*args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._sequence.in_step():
            return super().test_step(*args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._sequence.in_step():
            return super().predict_step(*args, **kwargs)

    # ------------------------------------------------------------------ data and loss

    def batch_to_device(self, batch: Any, device: Optional[torch.device] = None, dataloader_idx: int = 0) -> Any:
        return self.shard_batch(super().batch_to_device(batch, device, dataloader_idx))

    def shard_batch(self, batch: Any) -> Any:
        """This rank's shard of a dict batch (the module's ``sequence_keys`` along dim 1), plus
        global ``position_ids`` (B, T) when absent, also with sp=1. Per-token outputs are shards
        too: ``sharding.gather_sequence(x, strategy.sp_group, strategy.sequence_layout)``.

        Raises:
            ValueError: see ``sharding.sequence_entries``; a length the layout cannot split.
        """
        return self._sequence.shard(batch, self.parallel_dims, self.global_rank, self.lightning_module)

    def backward(self, closure_loss: Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> Tensor:
        """Backpropagate ``closure_loss`` times the batch's loss scale (``loss_contract``).

        Both automatic optimization and ``manual_backward`` come through here; the loss the
        module logs and returns is left as it is.
        """
        closure_loss = self._sequence.scale_for_backward(closure_loss)
        with self._sequence.in_step():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    def reduce_token_loss(self, loss_sum: Tensor, num_tokens: Union[Tensor, int]) -> Tuple[Tensor, Tensor]:
        """The explicit path: ``loss_contract.reduce_token_loss`` over this rank's sequence group.

        Returns ``(loss_to_backprop, mean_loss)``; marks this batch's loss as final, so
        ``backward`` does not rescale it. To *sum* ``mean_loss`` across groups, reduce over
        :attr:`dp_group`.
        """
        return self._sequence.reduce_token_loss(loss_sum, num_tokens, self.sequence_parallel_size)
