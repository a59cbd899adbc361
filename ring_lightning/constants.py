"""Values that the data, the LightningModule and the strategy must agree on, defined once.

* ``IGNORE_INDEX``: the label of a position that carries no loss (PyTorch's
  ``cross_entropy`` default, so losses need no extra argument to agree with the data).
* ``DEFAULT_SEQUENCE_KEYS``: the batch entries split along the sequence (dim 1) under
  sequence parallelism unless a LightningModule names its own ``sequence_keys``.
"""

from __future__ import annotations

from typing import Tuple

IGNORE_INDEX = -100
DEFAULT_SEQUENCE_KEYS: Tuple[str, ...] = ("input_ids", "labels", "position_ids", "loss_mask", "document_ids")

#: ``attn_implementation`` name under which ``ring_lightning.hf`` registers the ring with
#: transformers (kept here so the strategy can recognise it without importing transformers).
HF_ATTN_IMPLEMENTATION = "ring_lightning"
