"""The model, above the attention and below parallelism: it knows nothing of ranks or strategies.

* ``model``: :class:`~ring_lightning.models.model.LongDocTransformer` and its blocks;
* ``model_config``: :class:`~ring_lightning.models.model_config.ModelConfig` and the size presets;
* ``activations``: activation checkpointing, host offload, tiled MLP;
* ``loss``: the chunked linear + cross-entropy;
* ``flops``: attention pairs and model FLOPs (the masks' share of the work);
* ``memory_estimate``: the per-device memory of a configuration, before anything is built.

This ``__init__`` imports nothing, so importing one part never runs the others.
"""
