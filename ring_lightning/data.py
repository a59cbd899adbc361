"""LongDocumentDataModule: long documents packed into fixed windows, and a retrieval task.

Sources (``source=``):

* ``stdlib`` (default): the Python standard library's own ``.py`` files, which every
  Python install carries. Real text nobody here wrote, long documents, no download.
* ``files``: local text files, directories or globs (``paths=``).
* ``hub``: any Hugging Face hub dataset (``hub_name=``, ``text_column=``), streamed.
* ``retrieval``: synthetic long-range key/value retrieval. The pairs sit at the start of
  the sequence and the queries from ``retrieval_query_start * seq_len`` on, so that
  under sequence parallelism (either layout, any group size) the answer needs keys held
  by another rank. Only answer positions carry labels (see ``RetrievalDataset``).

Text sources are tokenized (bytes by default: ids 0..255 plus PAD/BOS/EOS), joined with
EOS between documents, cut into windows of ``seq_len + 1`` tokens (inputs and next-token
labels), and cached as a memory-mapped ``datasets`` table under ``cache_dir``
(default ``~/.cache/ring_lightning/data``), keyed by everything that changes the windows.

Batches are dicts: ``input_ids`` (B, T) long, ``labels`` (B, T) long (-100 = ignored),
optional ``document_ids`` (B, T) long (index of the document within the window) and, for
retrieval, ``loss_mask`` (B, T) float (1.0 at answers). No ``position_ids``: the strategy
adds global ones, the LightningModule adds ``arange`` otherwise.

``datasets`` is imported inside functions: ``import ring_lightning.data`` works without it.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ring_lightning.constants import IGNORE_INDEX

SOURCES = ("stdlib", "files", "hub", "retrieval")
_CACHE_VERSION = 1  # bump when the window format changes

# Retrieval token ranges (inside the byte vocabulary, so one model serves every source).
RETRIEVAL_KEY_BASE, RETRIEVAL_VALUE_BASE, RETRIEVAL_MAX_VOCAB = 128, 192, 64
RETRIEVAL_FILLER = (97, 123)  # lowercase letters: never a key, a value or the slot
RETRIEVAL_SLOT = 63  # "?": follows each query key, where the value would be


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus PAD=256, BOS=257, EOS=258. Needs no download."""

    name = "byte"
    pad_token_id, bos_token_id, eos_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer (``transformers``, imported lazily) with the same interface."""

    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as err:
            raise ImportError(
                f"tokenizer={name!r} needs the `transformers` package (pip install transformers); "
                f"tokenizer='byte' needs nothing"
            ) from err
        self.name = name
        self._tok = AutoTokenizer.from_pretrained(name)
        self.eos_token_id = self._tok.eos_token_id if self._tok.eos_token_id is not None else self._tok.sep_token_id
        if self.eos_token_id is None:
            raise ValueError(f"tokenizer={name!r} has no eos (or sep) token to put between documents")
        self.vocab_size = len(self._tok)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(name: str) -> Union[ByteTokenizer, HFTokenizer]:
    """``"byte"`` -> ByteTokenizer; anything else is a Hugging Face tokenizer name or path."""
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


# --------------------------------------------------------------------------- documents


def stdlib_files() -> List[str]:
    """The standard library's ``.py`` files, sorted (site-packages and caches excluded)."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(out)


def expand_paths(paths: Union[str, Sequence[str], None]) -> List[str]:
    """Files named by ``paths`` (files, directories searched recursively, or globs), sorted.

    Raises:
        ValueError: nothing given or nothing matched.
    """
    if paths is None or (isinstance(paths, (list, tuple)) and not paths):
        raise ValueError("source='files' needs paths=... (files, directories or glob patterns)")
    out = set()
    for p in [paths] if isinstance(paths, str) else list(paths):
        p = os.path.expanduser(str(p))
        for match in glob.glob(p, recursive=True) or []:
            if os.path.isdir(match):
                for dirpath, _, filenames in os.walk(match):
                    out.update(os.path.join(dirpath, f) for f in filenames)
            elif os.path.isfile(match):
                out.add(match)
    if not out:
        raise ValueError(f"paths={paths!r} matched no file")
    return sorted(out)


def _read_files(files: Sequence[str]) -> Iterator[str]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()


def _hub_texts(name: str, config: Optional[str], split: str, column: str) -> Iterator[str]:
    import datasets

    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as err:  # connection, auth, unknown name: one actionable message
        raise RuntimeError(
            f"could not load hub dataset hub_name={name!r} (hub_config={config!r}, hub_split={split!r}): {err}\n"
            "If this machine is offline: build the cache once on a machine with internet (the packed "
            "windows are cached under cache_dir and reused offline), or download the data and use "
            "source='files' with paths=..., or use source='stdlib' (no download)."
        ) from err
    for row in stream:
        if column not in row:
            raise ValueError(f"text_column={column!r} is not a column of {name!r}; columns: {sorted(row)}")
        yield row[column]


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


# ---------------------------------------------------------------------- torch datasets


class WindowDataset(Dataset):
    """Rows of a (num_windows, seq_len + 1) token table as next-token samples."""

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
    """

    def __init__(self, num_samples: int, seq_len: int, num_pairs: int, num_keys: int,
                 num_values: int, query_start: float, seed: int):
        self.num_samples, self.seq_len, self.num_pairs = num_samples, seq_len, num_pairs
        self.num_keys, self.num_values, self.seed = num_keys, num_values, seed
        self.query_pos = int(query_start * seq_len)
        assert 2 * num_pairs + 1 <= self.query_pos and self.query_pos + 2 * num_pairs <= seq_len

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
    """The accuracy hook of the retrieval task: (correct, total) over labelled positions.

    Args:
        logits: (B, T, V). labels: (B, T) with -100 where nothing is asked.

    Returns:
        Two float32 scalars, to be summed over ranks before dividing.
    """
    valid = labels != IGNORE_INDEX
    correct = (logits.argmax(-1) == labels) & valid
    return correct.sum().float(), valid.sum().float()


# ------------------------------------------------------------------------- datamodule


class LongDocumentDataModule(pl.LightningDataModule):
    """Long documents (or the retrieval task) as fixed-length next-token batches.

    Args:
        source: stdlib | files | hub | retrieval.
        seq_len: tokens per sample (the GLOBAL length; the strategy shards it).
        batch_size: samples per batch and per data-parallel rank.
        num_workers: DataLoader worker processes.
        val_fraction: fraction of windows (or of ``retrieval_num_samples``) held out, in (0, 1).
        seed: document order, the train shuffle and the retrieval samples.
        tokenizer: ``"byte"`` (no download) or a Hugging Face tokenizer name.
        max_tokens: tokens read from a text source (None: everything). The default keeps
            a CPU run quick; raise it for long runs.
        paths: for ``files``: files, directories or glob patterns.
        hub_name, hub_config, hub_split, text_column: for ``hub``.
        return_document_ids: add ``document_ids`` to batches (add the key to the module's
            ``sequence_keys`` so the strategy shards it).
        cache_dir: where packed windows are cached (default ``~/.cache/ring_lightning/data``).
        retrieval_num_samples: training sequences of the retrieval task.
        retrieval_num_pairs: key/value pairs (and queries) per sequence; 1 = pure long-range
            copy, >= 2 also needs key matching (slower to learn).
        retrieval_num_keys: size of the key vocabulary (<= 64, >= num_pairs).
        retrieval_num_values: size of the value vocabulary (<= 64); chance = 1 / this.
        retrieval_query_start: where queries begin, as a fraction of ``seq_len``. 0.5 puts
            them on another rank than the keys for any sp >= 2 and either layout.
        pin_memory: None = on when CUDA is available.

    Raises:
        ValueError: an argument outside its valid values (the message names it).
    """

    def __init__(
        self,
        source: str = "stdlib",
        seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        val_fraction: float = 0.05,
        seed: int = 0,
        tokenizer: str = "byte",
        max_tokens: Optional[int] = 2_000_000,
        paths: Union[str, Sequence[str], None] = None,
        hub_name: Optional[str] = None,
        hub_config: Optional[str] = None,
        hub_split: str = "train",
        text_column: str = "text",
        return_document_ids: bool = False,
        cache_dir: Optional[str] = None,
        retrieval_num_samples: int = 20_000,
        retrieval_num_pairs: int = 1,
        retrieval_num_keys: int = 16,
        retrieval_num_values: int = 16,
        retrieval_query_start: float = 0.5,
        pin_memory: Optional[bool] = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"source={source!r} is not valid; valid values: {SOURCES}")
        for name, value, low in (("seq_len", seq_len, 2), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if max_tokens is not None and max_tokens < seq_len + 1:
            raise ValueError(f"max_tokens must be None or >= seq_len + 1 = {seq_len + 1}, got {max_tokens}")
        if source == "hub" and not hub_name:
            raise ValueError("source='hub' needs hub_name=... (a Hugging Face dataset name)")
        if source == "files":
            expand_paths(paths)  # fail now, not in a worker
        if source == "retrieval":
            self._check_retrieval(seq_len, retrieval_num_samples, retrieval_num_pairs, retrieval_num_keys,
                                  retrieval_num_values, retrieval_query_start)
            if tokenizer != "byte":
                raise ValueError("source='retrieval' uses byte ids; valid values of tokenizer: ('byte',)")
        self.save_hyperparameters()
        self.source, self.seq_len, self.batch_size, self.num_workers = source, seq_len, batch_size, num_workers
        self.val_fraction, self.seed, self.tokenizer_name, self.max_tokens = val_fraction, seed, tokenizer, max_tokens
        self.paths, self.hub_name, self.hub_config, self.hub_split = paths, hub_name, hub_config, hub_split
        self.text_column, self.return_document_ids = text_column, return_document_ids
        self.cache_dir = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "ring_lightning", "data"))
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._tokenizer = None
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None

    @staticmethod
    def _check_retrieval(seq_len, num_samples, num_pairs, num_keys, num_values, query_start) -> None:
        if num_samples < 1:
            raise ValueError(f"retrieval_num_samples must be >= 1, got {num_samples}")
        if not 1 <= num_keys <= RETRIEVAL_MAX_VOCAB or not 2 <= num_values <= RETRIEVAL_MAX_VOCAB:
            raise ValueError(
                f"retrieval_num_keys must be in 1..{RETRIEVAL_MAX_VOCAB} and retrieval_num_values in "
                f"2..{RETRIEVAL_MAX_VOCAB}, got {num_keys} and {num_values}"
            )
        if not 1 <= num_pairs <= num_keys:
            raise ValueError(f"retrieval_num_pairs must be in 1..retrieval_num_keys={num_keys}, got {num_pairs}")
        q0 = int(query_start * seq_len)
        if not 0.0 < query_start < 1.0 or q0 < 2 * num_pairs + 1 or q0 + 2 * num_pairs > seq_len:
            raise ValueError(
                f"retrieval_query_start={query_start} must leave room for {num_pairs} pairs before it and "
                f"{num_pairs} queries after it in seq_len={seq_len} (need {2 * num_pairs + 1} <= "
                f"query_start * seq_len <= {seq_len - 2 * num_pairs})"
            )

    # -------------------------------------------------------------------- properties
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Ids the model must embed (259 for bytes; retrieval uses byte ids too)."""
        return ByteTokenizer.vocab_size if self.source == "retrieval" else self.tokenizer.vocab_size

    @property
    def task_metric(self) -> Optional[str]:
        """Name of the task metric the LightningModule logs as ``val/<name>`` (None: none)."""
        return "retrieval_acc" if self.source == "retrieval" else None

    # ------------------------------------------------------------------------ cache
    def _cache_path(self) -> str:
        if self.source == "stdlib":
            files = stdlib_files()
            root = sysconfig.get_paths()["stdlib"]
            # Sizes, not mtimes: the same Python version on another machine hits the cache.
            fingerprint = [sys.version, [(os.path.relpath(f, root), os.path.getsize(f)) for f in files]]
        elif self.source == "files":
            fingerprint = [(f, os.path.getsize(f), os.path.getmtime(f)) for f in expand_paths(self.paths)]
        else:
            fingerprint = [self.hub_name, self.hub_config, self.hub_split, self.text_column]
        key = json.dumps([_CACHE_VERSION, self.source, fingerprint, self.tokenizer_name, self.seq_len,
                          self.max_tokens, self.seed], sort_keys=True)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return os.path.join(self.cache_dir, f"{self.source}-{self.seq_len}-{digest}")

    def _texts(self) -> Iterator[str]:
        if self.source == "hub":
            return _hub_texts(self.hub_name, self.hub_config, self.hub_split, self.text_column)
        files = stdlib_files() if self.source == "stdlib" else expand_paths(self.paths)
        # A seeded shuffle of the documents: max_tokens then samples the whole corpus, and
        # the held-out tail is not one alphabetical corner of it.
        random.Random(self.seed).shuffle(files)
        return _read_files(files)

    def _build(self, path: str) -> None:
        import datasets
        import pyarrow as pa

        windows = pack_documents(self._texts(), self.tokenizer, self.seq_len, self.max_tokens)
        if len(windows) < 2:
            raise ValueError(
                f"source={self.source!r} gave {len(windows)} window(s) of seq_len + 1 = {self.seq_len + 1} "
                f"tokens; need at least 2 (raise max_tokens or add documents, or lower seq_len)"
            )
        column = pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1)), self.seq_len + 1)
        tmp = f"{path}.tmp-{os.getpid()}"
        datasets.Dataset(pa.table({"tokens": column})).save_to_disk(tmp)
        # Rename into place: concurrent builders never see (or leave) a half-written cache.
        try:
            os.rename(tmp, path)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first

    def prepare_data(self) -> None:
        """Build the window cache (Lightning runs this on one process per node)."""
        if self.source != "retrieval":
            path = self._cache_path()
            if not os.path.isdir(path):
                os.makedirs(self.cache_dir, exist_ok=True)
                self._build(path)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_dataset is not None:
            return
        if self.source == "retrieval":
            hp = self.hparams
            n_val = max(1, int(hp.retrieval_num_samples * self.val_fraction))
            common = dict(seq_len=self.seq_len, num_pairs=hp.retrieval_num_pairs, num_keys=hp.retrieval_num_keys,
                          num_values=hp.retrieval_num_values, query_start=hp.retrieval_query_start)
            self.train_dataset = RetrievalDataset(hp.retrieval_num_samples, seed=self.seed, **common)
            self.val_dataset = RetrievalDataset(n_val, seed=self.seed + 7919, **common)  # disjoint seeds
            return
        import datasets

        self.prepare_data()  # no-op when the cache exists
        table = datasets.load_from_disk(self._cache_path()).with_format("numpy")
        n_val = max(1, round(len(table) * self.val_fraction))
        n_train = len(table) - n_val
        if n_train < 1:
            raise ValueError(f"val_fraction={self.val_fraction} leaves no training window out of {len(table)}")
        eos = self.tokenizer.eos_token_id
        self.train_dataset = WindowDataset(table.select(range(n_train)), eos, self.return_document_ids)
        self.val_dataset = WindowDataset(table.select(range(n_train, len(table))), eos, self.return_document_ids)

    # ------------------------------------------------------------------ dataloaders
    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # No DistributedSampler here: Lightning inserts one with the strategy's
        # distributed_sampler_kwargs (RingStrategy: over the dp axis only).
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)
