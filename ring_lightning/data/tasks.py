"""The synthetic long-range retrieval task: its token layout, its datasets and its metric.

A task is what the data module needs beyond windows of text: it generates its own samples
and says how it is scored. ``RetrievalTask`` offers ``vocab_size``, ``metric_name`` (logged
as ``val/<metric_name>``), ``metric(logits, labels) -> (correct, total)`` and
``datasets(val_fraction, seed) -> (train, val)``; the LightningModule only calls the metric
through the data module, so it never depends on a particular task.

The pairs sit at the start of the sequence and the queries from ``query_start * seq_len`` on,
so that under sequence parallelism (either layout, any group size) the answer needs keys
held by another rank. Only answer positions carry labels (see ``RetrievalDataset``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Tuple

import torch
from torch.utils.data import Dataset

from ring_lightning.constants import IGNORE_INDEX
from ring_lightning.data.tokenizers import ByteTokenizer

# Retrieval token ranges (inside the byte vocabulary, so one model serves every source).
RETRIEVAL_KEY_BASE, RETRIEVAL_VALUE_BASE, RETRIEVAL_MAX_VOCAB = 128, 192, 64
RETRIEVAL_FILLER = (97, 123)  # lowercase letters: never a key, a value or the slot
RETRIEVAL_SLOT = 63  # "?": follows each query key, where the value would be


def _check_layout(seq_len: int, num_pairs: int, query_start: float) -> None:
    """The pairs must fit before the queries, and the queries before the end."""
    q0 = int(query_start * seq_len)
    if not 0.0 < query_start < 1.0 or q0 < 2 * num_pairs + 1 or q0 + 2 * num_pairs > seq_len:
        raise ValueError(
            f"retrieval_query_start={query_start} must leave room for {num_pairs} pairs before it and "
            f"{num_pairs} queries after it in seq_len={seq_len} (need {2 * num_pairs + 1} <= "
            f"query_start * seq_len <= {seq_len - 2 * num_pairs})"
        )


class RetrievalDataset(Dataset):
    """Synthetic key/value retrieval; sample ``i`` is a pure function of (seed, i).

    Layout of the ``seq_len`` input tokens (P pairs, queries from ``q0 = query_start * seq_len``)::

        BOS k1 v1 k2 v2 ... kP vP  filler ...  kq1 ? kq2 ? ... kqP ?  filler ...
        0   1                                  q0

    Keys are distinct, drawn from ``num_keys`` ids; values from ``num_values`` ids; filler
    is lowercase letters; ``?`` is a slot. Each key is queried once, in random order, and
    labelled with its value; every other position is ignored (-100). Values appear only in
    the pairs, never near the queries, so under sequence parallelism any accuracy above
    chance (``1 / num_values``) is information that crossed shards. Copying some value of
    the context without matching keys scores ``1 / num_pairs``; matching keys scores 1.
    Measured with the ``tiny`` preset (2 layers), seq_len 512, batch 16, lr 1e-3: one pair
    (the default) is solved in ~200 steps; two pairs reach the 50% of copying in ~250 steps
    and 80% (key matching, an induction circuit) after 550-1500 steps depending on the seed.

    Raises:
        ValueError: the pairs and queries do not fit in ``seq_len``.
    """

    def __init__(self, num_samples: int, seq_len: int, num_pairs: int, num_keys: int,
                 num_values: int, query_start: float, seed: int):
        _check_layout(seq_len, num_pairs, query_start)
        self.num_samples, self.seq_len, self.num_pairs = num_samples, seq_len, num_pairs
        self.num_keys, self.num_values, self.seed = num_keys, num_values, seed
        self.query_pos = int(query_start * seq_len)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        P, q0 = self.num_pairs, self.query_pos
        tokens = torch.randint(*RETRIEVAL_FILLER, (self.seq_len,), generator=g)
        keys = torch.randperm(self.num_keys, generator=g)[:P] + RETRIEVAL_KEY_BASE
        values = torch.randint(self.num_values, (P,), generator=g) + RETRIEVAL_VALUE_BASE
        tokens[0] = ByteTokenizer.bos_token_id
        tokens[1 : 1 + 2 * P : 2], tokens[2 : 2 + 2 * P : 2] = keys, values
        order = torch.randperm(P, generator=g)
        tokens[q0 : q0 + 2 * P : 2], tokens[q0 + 1 : q0 + 2 * P : 2] = keys[order], RETRIEVAL_SLOT
        labels = torch.full((self.seq_len,), IGNORE_INDEX)
        labels[q0 : q0 + 2 * P : 2] = values[order]  # at a query key: predict its value
        loss_mask = (labels != IGNORE_INDEX).float()
        return {"input_ids": tokens, "labels": labels, "loss_mask": loss_mask}


def retrieval_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The accuracy of the retrieval task: (correct, total) over labelled positions.

    Args:
        logits: (B, T, V). labels: (B, T) with -100 where nothing is asked.

    Returns:
        Two float32 scalars, to be summed over ranks before dividing.
    """
    valid = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & valid
    return correct.sum().float(), valid.sum().float()


@dataclass(frozen=True)
class RetrievalTask:
    """The retrieval task's settings, checked once, and what the data module asks of a task.

    Built by ``LongDocumentDataModule`` from its ``retrieval_*`` arguments (the fields
    without the prefix), so error messages name those arguments: that is where they are set.

    Raises:
        ValueError: a setting outside its valid values (the message names it).
    """

    seq_len: int
    num_samples: int
    num_pairs: int
    num_keys: int
    num_values: int
    query_start: float

    #: Logged by the LightningModule as ``val/retrieval_acc``.
    metric_name: ClassVar[str] = "retrieval_acc"
    #: Samples use byte ids (see the ``RETRIEVAL_*`` ranges), so any byte-vocabulary model fits.
    vocab_size: ClassVar[int] = ByteTokenizer.vocab_size

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"retrieval_num_samples must be >= 1, got {self.num_samples}")
        if not 1 <= self.num_keys <= RETRIEVAL_MAX_VOCAB or not 2 <= self.num_values <= RETRIEVAL_MAX_VOCAB:
            raise ValueError(
                f"retrieval_num_keys must be in 1..{RETRIEVAL_MAX_VOCAB} and retrieval_num_values in "
                f"2..{RETRIEVAL_MAX_VOCAB}, got {self.num_keys} and {self.num_values}"
            )
        if not 1 <= self.num_pairs <= self.num_keys:
            raise ValueError(
                f"retrieval_num_pairs must be in 1..retrieval_num_keys={self.num_keys}, got {self.num_pairs}"
            )
        _check_layout(self.seq_len, self.num_pairs, self.query_start)

    #: ``metric(logits, labels) -> (correct, total)``, summed over batches and ranks.
    metric = staticmethod(retrieval_accuracy)

    def datasets(self, val_fraction: float, seed: int) -> Tuple[RetrievalDataset, RetrievalDataset]:
        """Train (``num_samples``) and validation (``val_fraction`` of that, >= 1) datasets."""
        n_val = max(1, int(self.num_samples * val_fraction))
        common = dict(seq_len=self.seq_len, num_pairs=self.num_pairs, num_keys=self.num_keys,
                      num_values=self.num_values, query_start=self.query_start)
        train = RetrievalDataset(self.num_samples, seed=seed, **common)
        val = RetrievalDataset(n_val, seed=seed + 7919, **common)  # disjoint seeds
        return train, val
