"""Packing: documents -> one token stream -> fixed windows, and windows -> training samples.

Documents are joined with EOS after each one (boundaries stay visible to the model and to
``document_ids``) and cut into windows of ``seq_len + 1`` tokens: ``seq_len`` inputs plus one
more so that the next-token labels of the last input are in the same window.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import Dataset


def pack_documents(texts: Iterator[str], tokenizer, seq_len: int, max_tokens: Optional[int]) -> np.ndarray:
    """Tokenize, join with EOS after every document, cut into windows of ``seq_len + 1``.

    Args:
        texts: documents in order.
        tokenizer: has ``encode(text) -> int32 array`` and ``eos_token_id``.
        seq_len: tokens per training sample; windows carry one more for the shifted labels.
        max_tokens: stop reading once this many tokens are collected (None: read all).

    Returns:
        int32 array (num_windows, seq_len + 1); the incomplete tail is dropped.
    """
    eos = np.array([tokenizer.eos_token_id], dtype=np.int32)
    parts, total = [], 0
    for text in texts:
        ids = tokenizer.encode(text)
        parts += [ids, eos]
        total += len(ids) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    if max_tokens is not None:
        stream = stream[:max_tokens]
    num_windows = len(stream) // (seq_len + 1)
    return stream[: num_windows * (seq_len + 1)].reshape(num_windows, seq_len + 1)  # (W, seq_len + 1)


class WindowDataset(Dataset):
    """Rows of a (num_windows, seq_len + 1) token table as next-token samples.

    ``table[i]["tokens"]`` is one window (a ``datasets`` table in numpy format, or anything
    indexed the same way). Samples: ``input_ids`` and ``labels`` (T,) long, and with
    ``return_document_ids`` also ``document_ids`` (T,) long, the index of the document
    within the window.
    """

    def __init__(self, table, eos_id: int, return_document_ids: bool = False):
        self.table, self.eos_id, self.return_document_ids = table, eos_id, return_document_ids

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        window = torch.as_tensor(np.asarray(self.table[int(i)]["tokens"]), dtype=torch.long)  # (T + 1,)
        sample = {"input_ids": window[:-1], "labels": window[1:]}
        if self.return_document_ids:
            is_eos = (sample["input_ids"] == self.eos_id).long()
            # An EOS closes its document, so it keeps that document's id.
            sample["document_ids"] = torch.cumsum(is_eos, 0) - is_eos
        return sample
