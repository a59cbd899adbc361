"""ring_lightning: exact ring attention and sequence parallelism for PyTorch Lightning.

The heavy parts are imported lazily so that ``ring_lightning.attention`` and the
benchmarks work where only torch is installed (Lightning, datasets, Hydra optional there).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "RingStrategy": "ring_lightning.parallel.strategy",
    "RingFSDPStrategy": "ring_lightning.parallel.fsdp",
    "LongDocTransformer": "ring_lightning.models.model",
    "ModelConfig": "ring_lightning.models.model",
    "LongDocumentLM": "ring_lightning.training.module",
    "LongDocumentDataModule": "ring_lightning.data",
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ring_lightning' has no attribute {name!r}")
