"""The on-disk window cache: packed windows stored once as a memory-mapped ``datasets`` table.

The cache key holds everything that changes the windows (the source's fingerprint, the
tokenizer, ``seq_len``, ``max_tokens``, the document-order seed and ``CACHE_VERSION``), so
a changed setting builds a new cache and an unchanged one, even on another machine or
offline, reuses the old one. ``datasets`` and ``pyarrow`` are imported inside the functions:
importing the data package must not need them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Optional

import numpy as np

CACHE_VERSION = 1  # bump when the window format changes


def default_cache_dir(cache_dir: Optional[str] = None) -> str:
    """``cache_dir`` with ``~`` expanded, or ``~/.cache/ring_lightning/data`` when None."""
    return os.path.expanduser(cache_dir or os.path.join("~", ".cache", "ring_lightning", "data"))


def window_cache_path(cache_dir: str, source: str, fingerprint: Any, tokenizer: str, seq_len: int,
                      max_tokens: Optional[int], seed: int) -> str:
    """The folder that holds (or will hold) the windows of these settings."""
    key = json.dumps([CACHE_VERSION, source, fingerprint, tokenizer, seq_len, max_tokens, seed], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{source}-{seq_len}-{digest}")


def save_windows(path: str, windows: np.ndarray) -> None:
    """Write ``windows`` (num_windows, seq_len + 1) under ``path``; safe against concurrent builders."""
    import datasets
    import pyarrow as pa

    column = pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1)), windows.shape[1])
    tmp = f"{path}.tmp-{os.getpid()}"
    datasets.Dataset(pa.table({"tokens": column})).save_to_disk(tmp)
    # Rename into place: concurrent builders never see (or leave) a half-written cache.
    try:
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first


def load_windows(path: str):
    """The table saved by ``save_windows``, memory-mapped, rows as numpy (``table[i]["tokens"]``)."""
    import datasets

    return datasets.load_from_disk(path).with_format("numpy")
