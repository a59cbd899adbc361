"""The loss contract: a user's own loss gives the one-device gradient under sequence sharding.

Under ``RingStrategy(sequence_parallel_size=sp)`` each rank of a sequence group holds a
shard of every sample, and DDP averages gradients over all ``dp * sp`` ranks. A module
that returns the usual per-token mean, ``F.cross_entropy(logits, labels,
ignore_index=-100)``, computes ``L_r = S_r / n_r`` on rank ``r`` (``S_r`` the sum of its
token losses, ``n_r`` its count of labelled tokens). The one-device loss of the group's
batch is ``S / n`` with ``S = sum_r S_r`` and ``n = sum_r n_r``, so backpropagating

    L_r * sp * n_r / n          ("mean", the default)

on every rank makes DDP's world average exactly the ``sp=1`` gradient, however unevenly
the ignored labels fall. The strategy knows every ``n_r`` when it shards a batch (all
ranks of a group hold the same full batch), so no communication is needed, and the scale
stays a device tensor (no host synchronisation). With equal counts the scale is 1.

``"sum"`` (the module returns a sum of token losses) scales by ``sp``; ``"none"`` leaves
the loss alone (the module already reduces over the group, as
``RingStrategy.reduce_token_loss`` does; calling that method selects ``"none"`` for the
step by itself).

A shard with no labelled token at all: ``cross_entropy``'s mean is ``0/0 = nan`` there,
but its gradient is exactly zero (ignored positions receive no gradient) and the scale
is 0, so the step is exact; only that rank's own logged value is ``nan``. A hand-written
masked mean must clamp its denominator (``mask.sum().clamp(min=1)``) for the same.

Labels must be aligned per position before sharding (``labels[t]`` is the target of
``input_ids[t]``). The Hugging Face convention, ``labels = input_ids`` with the shift
inside the model, pairs tokens across shard boundaries under sharding: it is detected and
refused, or shifted for the user with ``shift_labels=True`` (see :func:`align_labels`).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from ring_lightning.sequence import sharding

LOSS_REDUCTIONS = ("mean", "sum", "none")


def labels_follow_inputs(batch: Mapping, label_key: str, ignore_index: int) -> bool:
    """True when the labels are the inputs themselves (ignored positions aside): the HF convention.

    Compares tensors, so on a device it synchronises: the strategy asks only for the first
    batches of a run (a loader does not change its label convention mid-run).
    """
    labels, ids = batch.get(label_key), batch.get("input_ids")
    if not (isinstance(labels, Tensor) and isinstance(ids, Tensor) and ids.shape == labels.shape):
        return False
    valid = labels != ignore_index
    return bool(valid.any()) and torch.equal(torch.where(valid, labels, ids), ids)


def align_labels(batch: Any, sp: int, shift_labels: Optional[bool], label_key: str, ignore_index: int,
                 check: bool = True) -> Any:
    """Labels aligned per position: shifted for the user, checked, or trusted.

    Args:
        batch: the full (unsharded) batch; non-dict batches pass through.
        sp: the sequence-parallel size (the refusal applies only when sp > 1).
        shift_labels: ``True``: ``labels[t] <- labels[t + 1]`` (and ``loss_mask`` with them),
            the last position ignored, so the user's loss must not shift again; ``None``:
            refuse labels that follow the inputs; ``False``: trust the labels as aligned.
        label_key: the batch entry holding labels.
        ignore_index: the label of positions without loss.
        check: compare labels with the inputs (refusal, or the double-shift warning).

    Raises:
        ValueError: ``shift_labels=None``, sp > 1 and labels that follow ``input_ids``.
    """
    if not isinstance(batch, Mapping) or not isinstance(batch.get(label_key), Tensor):
        return batch
    if shift_labels:
        if check and not labels_follow_inputs(batch, label_key, ignore_index):
            warnings.warn(f"RingStrategy(shift_labels=True) but batch[{label_key!r}] does not follow "
                          f"batch['input_ids']: if the labels are already aligned per position they are now "
                          f"shifted twice; set shift_labels=None", UserWarning)
        out = dict(batch)
        for key, fill in ((label_key, ignore_index), ("loss_mask", 0)):
            x = batch.get(key)
            if isinstance(x, Tensor) and x.shape == batch[label_key].shape:
                shifted = torch.full_like(x, fill)
                shifted[:, :-1] = x[:, 1:]  # (B, N): the target of token t is token t + 1
                out[key] = shifted
        return type(batch)(out) if type(batch) is not dict else out
    if shift_labels is None and sp > 1 and check and labels_follow_inputs(batch, label_key, ignore_index):
        raise ValueError(
            f"batch[{label_key!r}] follows batch['input_ids'] (the Hugging Face convention: the model "
            f"shifts labels inside). Under sequence parallelism (sequence_parallel_size={sp}) each rank "
            f"holds a shard, so a shift inside the model pairs tokens of different shards. Either let "
            f"the strategy shift before sharding, RingStrategy(shift_labels=True) "
            f"(train.py: strategy.shift_labels=true), and drop the shift from your loss; or pass labels "
            f"already aligned per position (labels[t] = input_ids[t + 1]); or, if labels equal to the "
            f"inputs are what you mean, RingStrategy(shift_labels=False)."
        )
    return batch


def loss_scale(batch: Mapping, sp: int, rank: int, layout: str, reduction: str, label_key: str,
               ignore_index: int) -> Union[Tensor, float, None]:
    """What this rank's returned loss is multiplied by before backward (None: nothing).

    Args:
        batch: the full (unsharded) batch on the device.
        sp, rank, layout: the sequence group's size, this rank's index, the batch's layout.
        reduction: ``mean``, ``sum`` or ``none`` (see the module docstring).
        label_key, ignore_index: where the labels are and which value is ignored.

    Returns:
        A 0-dim float32 tensor for ``mean`` (``sp * n_rank / n`` with n counting labels
        != ignore_index, 0 where the batch has no labelled token), ``sp`` for ``sum``, None for ``none`` or when ``sp == 1``.
    """
    if sp == 1 or reduction == "none":
        return None
    if reduction == "sum":
        return float(sp)
    labels = batch.get(label_key)
    if not isinstance(labels, Tensor):
        return None  # no labels to count: a plain mean over positions, equal shards, scale 1
    # The documented "mean" counts labels != ignore_index, as cross_entropy's mean does; a
    # loss weighted by loss_mask is a different mean: use reduce_token_loss ("none") for it.
    weight_BN = (labels != ignore_index).float()
    total = weight_BN.sum()
    mine = sharding.shard_sequence(weight_BN, sp, rank, layout, dim=1).sum()
    return torch.where(total > 0, sp * mine / total.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


def reduce_token_loss(loss_sum: Tensor, num_tokens: Union[Tensor, int],
                      sp: int, group: Optional["dist.ProcessGroup"]) -> Tuple[Tensor, Tensor]:
    """Token-weighted loss over a sequence group, scaled for DDP's world average.

    Call it as ``trainer.strategy.reduce_token_loss(...)``: the strategy's method also tells
    its backward not to rescale this loss again.

    Each rank of a sequence group holds ``num_tokens`` of the sample's valid tokens.
    Backpropagating ``loss_sum * sp / total_tokens`` on every rank makes DDP's average
    over all ``dp * sp`` ranks equal the mean over sequence groups of each group's
    token-mean loss gradient: exactly the ``sp=1`` gradient, ignored labels included.

    Args:
        loss_sum: sum of the token losses of this rank's shard (with grad).
        num_tokens: number of valid tokens in this rank's shard.
        sp, group: the sequence group's size and process group (None when sp == 1).

    Returns:
        ``(loss_to_backprop, mean_loss)``: the first carries the gradient; the second
        (detached) is the group's token-mean loss, identical on every rank of the group,
        so a world-wide mean of it (``self.log(..., sync_dist=True)``) counts each group once.
    """
    # float64: token counts stay exact far beyond float32's 2**24, sums stay accurate.
    stats = torch.stack(
        [loss_sum.detach().to(torch.float64), torch.as_tensor(num_tokens, device=loss_sum.device).to(torch.float64)]
    )
    if group is not None:
        dist.all_reduce(stats, group=group)
    total_tokens = stats[1].clamp(min=1.0)  # a shard (or group) with no valid token contributes 0
    scale = (sp / total_tokens).to(loss_sum.dtype)
    mean_loss = (stats[0] / total_tokens).to(loss_sum.dtype)
    return loss_sum * scale, mean_loss
