"""BatchShard: the facts of one batch, made once when the batch is sharded, read by its step.

``SequenceParallel.shard`` (core.py) creates one per batch, right after the batch reaches the
device; the step (forward), ``backward`` and the logged group loss read it; nothing else writes
it. It replaces strategy attributes set in one hook and read in another: a fact of a batch
cannot outlive it or half-change, because a new batch makes a new object.

Letters: N global sequence length, T local length (N / sp).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

from torch import Tensor

from ring_lightning.sequence.sharding import NOTHING_SPLIT, SequenceSharding


@dataclass(frozen=True)
class BatchShard:
    """One batch's sharding and loss facts.

    Args:
        sharding: what every ring attention call of the step reads (group, layout, the hybrid's
            groups), entered around the forward and the backward (``use_sequence_sharding``).
        layout: how the batch was cut (``contiguous`` / ``zigzag``; contiguous when nothing was).
        seq_len: the global length N (0: no sequence entry, nothing was sharded).
        positions: this rank's global positions (T,), None when nothing was sharded.
        loss_scale: what the returned loss is multiplied by before backward
            (``loss_contract.loss_scale``; None: nothing).
        loss_final: the module reduced its loss over the sequence group itself
            (``reduce_token_loss``): backward leaves it as it is.
    """

    sharding: SequenceSharding = NOTHING_SPLIT
    layout: str = "contiguous"
    seq_len: int = 0
    positions: Optional[Tensor] = None
    loss_scale: Union[Tensor, float, None] = None
    loss_final: bool = False

    @property
    def backward_scale(self) -> Union[Tensor, float, None]:
        """The factor backward applies (None: the loss is backpropagated as returned)."""
        return None if self.loss_final else self.loss_scale

    def with_final_loss(self) -> "BatchShard":
        """The same batch, its loss reduced by the module (``reduce_token_loss``)."""
        return replace(self, loss_final=True)


#: Before any batch, and for batches that pass through unsharded (sp=1, no sequence entry).
UNSHARDED = BatchShard()
