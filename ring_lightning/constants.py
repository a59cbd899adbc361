"""Constants shared by the strategy, the module and the data: one source for each.

``IGNORE_INDEX`` is the label of a position that carries no loss (PyTorch's
``cross_entropy`` default, the Hugging Face convention). ``DEFAULT_SEQUENCE_KEYS`` are the
batch entries the strategy shards along the sequence (dim 1) unless the LightningModule
sets ``sequence_keys``.
"""

IGNORE_INDEX = -100
DEFAULT_SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "loss_mask")
