"""LongDocumentDataModule: long documents packed into fixed windows, or a synthetic task.

The data module only wires the parts together: a text source (``sources``) read through a
tokenizer (``tokenizers``), packed into windows (``packing``) and cached on disk (``cache``);
or, for ``source='retrieval'``, the task of ``tasks``, which also supplies the metric the
LightningModule logs (``task_metric`` / ``task_metric_fn``).

Batches are dicts: ``input_ids`` (B, T) long, ``labels`` (B, T) long (-100 = ignored),
optional ``document_ids`` (B, T) long (index of the document within the window) and, for
retrieval, ``loss_mask`` (B, T) float (1.0 at answers). No ``position_ids``: the strategy
adds global ones, the LightningModule adds ``arange`` otherwise.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Tuple, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ring_lightning.data.cache import default_cache_dir, load_windows, save_windows, window_cache_path
from ring_lightning.data.packing import WindowDataset, pack_documents
from ring_lightning.data.resumable import EpochShuffleSampler, ResumableDataLoader
from ring_lightning.data.sources import TEXT_SOURCES, text_source
from ring_lightning.data.tasks import RetrievalTask
from ring_lightning.data.tokenizers import load_tokenizer, model_vocab_size
from ring_lightning.parallel.length_check import check_trainer_length

SOURCES = TEXT_SOURCES + ("retrieval",)


class LongDocumentDataModule(pl.LightningDataModule):
    """Long documents (or the retrieval task) as fixed-length next-token batches.

    Args:
        source: stdlib | files | hub | retrieval.
        seq_len: tokens per sample (the GLOBAL length; the strategy shards it).
        batch_size: samples per batch and per data-parallel rank.
        num_workers: DataLoader worker processes.
        val_fraction: fraction of windows (or of ``retrieval_num_samples``) held out, in (0, 1).
        seed: document order, the train shuffle and the retrieval samples.
        tokenizer: ``"byte"`` (no download), a local ``tokenizer.json``, a ``save_pretrained``
            directory, or a Hugging Face hub name.
        max_tokens: tokens read from a text source (None: everything). The default keeps
            a CPU run quick; raise it for long runs.
        paths: for ``files``: files, directories or glob patterns.
        hub_name, hub_config, hub_split, text_column: for ``hub``.
        return_document_ids: add ``document_ids`` (B, T) to batches, the index of each token's
            document in its window (a sequence key: the strategy shards it). LongDocumentLM
            confines attention to documents with them (``module.document_mask``).
        cache_dir: where packed windows are cached (default ``~/.cache/ring_lightning/data``).
        retrieval_num_samples: training sequences of the retrieval task.
        retrieval_num_pairs: key/value pairs (and queries) per sequence; 1 = pure long-range
            copy, >= 2 also needs key matching (slower to learn).
        retrieval_num_keys: size of the key vocabulary (<= 64, >= num_pairs).
        retrieval_num_values: size of the value vocabulary (<= 64); chance = 1 / this.
        retrieval_query_start: where queries begin, as a fraction of ``seq_len``. 0.5 puts
            them on another rank than the keys for any sp >= 2 and either layout.
        pin_memory: None = on when CUDA is available.

    The ``retrieval_*`` arguments stay flat (rather than one nested task argument) so that
    ``conf/data/retrieval.yaml`` and command-line overrides keep one level; they are grouped
    into ``self.task`` (a ``RetrievalTask``), which is None for text sources.

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
        return_document_ids: bool = True,
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
        self.task: Optional[RetrievalTask] = None
        self.text_source = None
        if source == "retrieval":
            self.task = RetrievalTask(seq_len, retrieval_num_samples, retrieval_num_pairs, retrieval_num_keys,
                                      retrieval_num_values, retrieval_query_start)
            if tokenizer != "byte":
                raise ValueError("source='retrieval' uses byte ids; valid values of tokenizer: ('byte',)")
        else:
            # Built now so that a missing hub_name or a glob matching nothing fails here.
            self.text_source = text_source(source, paths, hub_name, hub_config, hub_split, text_column)
        if paths is not None and not isinstance(paths, str):
            paths = [str(p) for p in paths]  # a plain list (Hydra hands a ListConfig): weights_only loads it
        self.save_hyperparameters()
        self.source, self.seq_len, self.batch_size, self.num_workers = source, seq_len, batch_size, num_workers
        self.val_fraction, self.seed, self.tokenizer_name, self.max_tokens = val_fraction, seed, tokenizer, max_tokens
        self.paths, self.hub_name, self.hub_config, self.hub_split = paths, hub_name, hub_config, hub_split
        self.text_column, self.return_document_ids = text_column, return_document_ids
        self.cache_dir = default_cache_dir(cache_dir)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._tokenizer = None
        self.train_dataset: Optional[Dataset] = None
        self.val_dataset: Optional[Dataset] = None

    # -------------------------------------------------------------------- properties
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Ids the model must embed (259 for bytes; retrieval uses byte ids too)."""
        return self.task.vocab_size if self.task is not None else self.tokenizer.vocab_size

    @property
    def model_vocab_size(self) -> int:
        """The model's vocabulary for this data: ``vocab_size`` rounded up to a multiple of 64
        (tokenizers.model_vocab_size; bytes stay 259). Pass it as ``model={"vocab_size": ...}``."""
        return model_vocab_size(self.vocab_size, "byte" if self.task is not None else self.tokenizer_name)

    @property
    def task_metric(self) -> Optional[str]:
        """Name of the task metric the LightningModule logs as ``val/<name>`` (None: none)."""
        return self.task.metric_name if self.task is not None else None

    @property
    def task_metric_fn(self) -> Optional[Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]]:
        """``fn(logits (B, T, V), labels (B, T)) -> (correct, total)`` scalars of one batch, to be
        summed over batches and ranks before dividing; None for plain language-model data."""
        return self.task.metric if self.task is not None else None

    # ------------------------------------------------------------------------ cache
    def _cache_path(self) -> str:
        return window_cache_path(self.cache_dir, self.source, self.text_source.fingerprint(), self.tokenizer_name,
                                 self.seq_len, self.max_tokens, self.seed)

    def _build(self, path: str) -> None:
        texts = self.text_source.texts(self.seed)
        windows = pack_documents(texts, self.tokenizer, self.seq_len, self.max_tokens)
        if len(windows) < 2:
            raise ValueError(
                f"source={self.source!r} gave {len(windows)} window(s) of seq_len + 1 = {self.seq_len + 1} "
                f"tokens; need at least 2 (raise max_tokens or add documents, or lower seq_len)"
            )
        save_windows(path, windows)

    def prepare_data(self) -> None:
        """Build the window cache (Lightning runs this on one process per node)."""
        if self.text_source is not None:
            path = self._cache_path()
            if not os.path.isdir(path):
                os.makedirs(self.cache_dir, exist_ok=True)
                self._build(path)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.trainer is not None:  # the model's attention and the strategy's split accept seq_len?
            check_trainer_length(self.seq_len, self.trainer, override="seq_len")
        if self.train_dataset is not None:
            return
        if self.task is not None:
            self.train_dataset, self.val_dataset = self.task.datasets(self.val_fraction, self.seed)
            return
        self.prepare_data()  # no-op when the cache exists
        table = load_windows(self._cache_path())
        n_val = max(1, round(len(table) * self.val_fraction))
        n_train = len(table) - n_val
        if n_train < 1:
            raise ValueError(f"val_fraction={self.val_fraction} leaves no training window out of {len(table)}")
        eos = self.tokenizer.eos_token_id
        self.train_dataset = WindowDataset(table.select(range(n_train)), eos, self.return_document_ids)
        self.val_dataset = WindowDataset(table.select(range(n_train, len(table))), eos, self.return_document_ids)

    # ------------------------------------------------------------------ dataloaders
    def _training_position(self) -> Tuple[int, int, int]:
        """(epoch, batches the training loop has processed in it, batches it takes per epoch):
        the data position a checkpoint keeps (``ResumableDataLoader``)."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0, 0
        per_epoch = trainer.num_training_batches
        processed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return trainer.current_epoch, processed, int(per_epoch) if per_epoch != float("inf") else 2**62

    def train_dataloader(self) -> DataLoader:
        # No DistributedSampler here: Lightning inserts one with the strategy's
        # distributed_sampler_kwargs (RingStrategy: over the dp axis only), seeded by
        # seed_everything; both orders depend only on (seed, epoch), which exact resume needs.
        return ResumableDataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(self.train_dataset, self.seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # its own generator: building an iterator then draws the workers' base seed from it,
            # not from the global one (whose state a checkpoint restores: RandomState)
            generator=torch.Generator().manual_seed(self.seed),
            position=self._training_position,
            # the position is tied to these windows: another corpus restarts the epoch (resumable.py)
            corpus=os.path.basename(self._cache_path()) if self.text_source is not None else None,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
