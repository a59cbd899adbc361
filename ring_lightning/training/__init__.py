"""Training with Lightning, above the model and the parallel layer.

* ``module``: :class:`~ring_lightning.training.module.LongDocumentLM`, the LightningModule;
* ``training_metrics``: tokens, FLOPs and MFU per step; ``schedule``: the learning-rate schedule;
* ``callbacks``: non-finite guard, final checkpoint, random state, config agreement, failure record;
* ``checkpoint_io``: atomic checkpoint writes and the newest valid checkpoint;
* ``run_log``, ``console``: each rank's log file and the console output during a run.

This ``__init__`` imports nothing, so importing one part never runs the others.
"""
