"""Data: long documents packed into fixed windows, and a synthetic long-range retrieval task.

Sources (``LongDocumentDataModule(source=...)``):

* ``stdlib`` (default): the Python standard library's own ``.py`` files, which every
  Python install carries. Real text nobody here wrote, long documents, no download.
* ``files``: local text files, directories or globs (``paths=``).
* ``hub``: any Hugging Face hub dataset (``hub_name=``, ``text_column=``), streamed.
* ``retrieval``: synthetic long-range key/value retrieval whose answers need keys held by
  another rank under sequence parallelism; it also supplies its metric (val/retrieval_acc).

Text sources are tokenized (bytes by default: ids 0..255 plus PAD/BOS/EOS), joined with
EOS between documents, cut into windows of ``seq_len + 1`` tokens (inputs and next-token
labels), and cached as a memory-mapped ``datasets`` table under ``cache_dir``
(default ``~/.cache/ring_lightning/data``), keyed by everything that changes the windows.

One idea per module: ``tokenizers``, ``sources``, ``packing`` (documents -> windows ->
samples), ``cache`` (windows on disk), ``tasks`` (the retrieval task and its metric) and
``datamodule`` (the LightningDataModule that wires them), ``resumable`` (a training loader a
resumed run continues at its batch: usable in your own data module). Every public name is re-exported
here, so ``ring_lightning.data.LongDocumentDataModule`` (the path the configs use) works.

``datasets`` is imported inside functions: ``import ring_lightning.data`` works without it.
"""

from ring_lightning.constants import IGNORE_INDEX
from ring_lightning.data.cache import CACHE_VERSION, default_cache_dir, load_windows, save_windows, window_cache_path
from ring_lightning.data.datamodule import SOURCES, LongDocumentDataModule
from ring_lightning.data.packing import WindowDataset, pack_documents
from ring_lightning.data.resumable import EpochShuffleSampler, ResumableDataLoader
from ring_lightning.data.sources import (
    TEXT_SOURCES,
    FileSource,
    HubSource,
    StdlibSource,
    expand_paths,
    stdlib_files,
    text_source,
)
from ring_lightning.data.tasks import (
    RETRIEVAL_FILLER,
    RETRIEVAL_KEY_BASE,
    RETRIEVAL_MAX_VOCAB,
    RETRIEVAL_SLOT,
    RETRIEVAL_VALUE_BASE,
    RetrievalDataset,
    RetrievalTask,
    retrieval_accuracy,
)
from ring_lightning.data.tokenizers import ByteTokenizer, HFTokenizer, load_tokenizer, model_vocab_size

__all__ = [
    "IGNORE_INDEX",
    "SOURCES",
    "TEXT_SOURCES",
    "CACHE_VERSION",
    "RETRIEVAL_FILLER",
    "RETRIEVAL_KEY_BASE",
    "RETRIEVAL_MAX_VOCAB",
    "RETRIEVAL_SLOT",
    "RETRIEVAL_VALUE_BASE",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "model_vocab_size",
    "StdlibSource",
    "FileSource",
    "HubSource",
    "stdlib_files",
    "expand_paths",
    "text_source",
    "pack_documents",
    "WindowDataset",
    "default_cache_dir",
    "window_cache_path",
    "save_windows",
    "load_windows",
    "RetrievalDataset",
    "RetrievalTask",
    "retrieval_accuracy",
    "LongDocumentDataModule",
    "ResumableDataLoader",
    "EpochShuffleSampler",
]
